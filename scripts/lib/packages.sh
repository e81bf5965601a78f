# What podnet needs from the system: scripts/packages, read for the scripts that source this file
# (.ci/run, scripts/testbed, scripts/test, the benchmark scripts). Sourced, not run.
#
#   ensure_packages WHO FEATURE...   install what FEATURE needs and is missing, or fail saying how
#   report_packages WHO FEATURE...   print what FEATURE needs, what is here, what would be installed
#
# Opt-out: PODNET_NO_INSTALL=1 turns installing into an error that names the packages.

PODNET_PACKAGES=${PODNET_PACKAGES:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/packages}

# "package item" for every command or file of a package that one of the features needs.
_package_items() {
    [[ -r $PODNET_PACKAGES ]] || { echo "packages: cannot read $PODNET_PACKAGES" >&2; return 1; }
    awk -v want="$*" '
        BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) wanted[w[i]] = 1 }
        /^[ \t]*(#|$)/ { next }
        {
            k = split($2, f, ",")
            for (i = 1; i <= k; i++) if (f[i] in wanted) { for (j = 3; j <= NF; j++) print $1, $j; break }
        }' "$PODNET_PACKAGES"
}

# A command on PATH (not a shell builtin: the tests run the binary), or an existing file.
_item_present() {
    if [[ $1 == /* ]]; then [[ -e $1 ]]; else type -P "$1" >/dev/null; fi
}

# Sets MISSING_PACKAGES and MISSING_ITEMS (each once, in list order) for the features.
_find_missing() {
    MISSING_PACKAGES=() MISSING_ITEMS=()
    local items pkg item
    items=$(_package_items "$@") || return 1
    while read -r pkg item; do
        [[ -n $pkg ]] || continue
        _item_present "$item" && continue
        MISSING_ITEMS+=("$item")
        [[ " ${MISSING_PACKAGES[*]} " == *" $pkg "* ]] || MISSING_PACKAGES+=("$pkg")
    done <<<"$items"
}

ensure_packages() {
    local who=$1; shift
    local features="$*"
    _find_missing "$@" || return 1
    ((${#MISSING_PACKAGES[@]})) || return 0
    local pkgs="${MISSING_PACKAGES[*]}" items="${MISSING_ITEMS[*]}"
    if [[ ${PODNET_NO_INSTALL:-} == 1 ]]; then
        echo "$who: missing $items (for ${features// /, }); install them with 'apt-get install $pkgs' (PODNET_NO_INSTALL=1 is set, so nothing is installed)" >&2
        return 1
    fi
    if ! type -P apt-get >/dev/null; then
        echo "$who: missing $items (for ${features// /, }), and this machine has no apt-get: install those commands with its package manager (Debian's packages: $pkgs)" >&2
        return 1
    fi
    if [[ $(id -u) != 0 ]]; then
        echo "$who: missing $items (for ${features// /, }): run as root to have them installed, or run 'apt-get install $pkgs'" >&2
        return 1
    fi
    echo "$who: installing $pkgs (for ${features// /, }: $items missing)" >&2
    # apt's and dpkg's progress goes to a log, shown only when the install fails.
    local log start=$SECONDS
    log=$(mktemp /tmp/podnet-apt.XXXXXX)
    # shellcheck disable=SC2086
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "$who: 'apt-get install $pkgs' failed (the lines above; all of it in $log); install them and run again" >&2
        return 1
    fi
    rm -f "$log"
    echo "$who: installed $pkgs ($((SECONDS - start)) s)" >&2
    _find_missing "$@" || return 1
    if ((${#MISSING_ITEMS[@]})); then
        echo "$who: still missing after apt-get install: ${MISSING_ITEMS[*]} (packages ${MISSING_PACKAGES[*]})" >&2
        return 1
    fi
}

report_packages() {
    local who=$1; shift
    local features="$*" items pkg item last="" line=""
    items=$(_package_items "$@") || return 1
    echo "$who: what ${features// /, } needs (scripts/packages):"
    while read -r pkg item; do
        [[ -n $pkg ]] || continue
        if [[ $pkg != "$last" ]]; then
            [[ -n $line ]] && echo "$line"
            line=$(printf '  %-28s' "$pkg") last=$pkg
        fi
        if _item_present "$item"; then line+=" $item"; else line+=" $item(missing)"; fi
    done <<<"$items"
    [[ -n $line ]] && echo "$line"
    _find_missing "$@" || return 1
    if ((${#MISSING_PACKAGES[@]})); then
        echo "would install: ${MISSING_PACKAGES[*]}"
    else
        echo "would install: nothing"
    fi
}
