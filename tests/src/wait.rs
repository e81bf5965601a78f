//! Waiting for a condition with a deadline.

use std::thread;
use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it returns `Ok` or `timeout` passes; the error then says
/// `what` was awaited and the last reason `check` gave.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}: {e}"
                ))
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until the output of a running `ping`, read anew by `log` each time, shows at least `n`
/// replies: traffic has been flowing for a while before a test breaks something.
pub fn wait_ping_replies(
    log: impl Fn() -> String,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    wait_for(&format!("{n} ping replies"), timeout, || {
        let text = log();
        let replies = text.lines().filter(|l| l.contains(" bytes from ")).count();
        (replies >= n).then_some(()).ok_or(text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_first_success() {
        let mut n = 0;
        let v = wait_for("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("n = {n}"))
            }
        });
        assert_eq!(v, Ok(3));
    }

    #[test]
    fn times_out_with_last_reason() {
        let start = Instant::now();
        let r: Result<(), String> = wait_for("never", Duration::from_millis(250), || {
            Err("still no".into())
        });
        let e = r.unwrap_err();
        assert!(e.contains("never") && e.contains("still no"), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn ping_replies_are_counted_from_the_log() {
        let log = "PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.\n\
                   64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.4 ms\n\
                   64 bytes from 10.244.2.2: icmp_seq=2 ttl=62 time=0.3 ms\n";
        assert_eq!(wait_ping_replies(|| log.into(), 2, Duration::ZERO), Ok(()));
        let e = wait_ping_replies(|| log.into(), 3, Duration::ZERO).unwrap_err();
        assert!(e.contains("3 ping replies"), "{e}");
    }
}
