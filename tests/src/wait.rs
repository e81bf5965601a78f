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
}
