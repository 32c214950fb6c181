//! Polling a status until the controller reports an outcome (polling GETs rather than a
//! watch: simple, and a 500 ms interval is plenty for a person at a terminal).

use std::time::Duration;

use tokio::time::Instant;

use super::KubectlError;

/// One look at the object.
pub(crate) enum Step<T> {
    Done(T),
    /// Not yet; what was seen, for progress and the timeout message.
    Pending(String),
}

pub(crate) enum Outcome<T> {
    Done(T),
    TimedOut { last_seen: String },
}

/// Checks at once, then every `interval`, until `check` is done or `timeout` passes.
pub(crate) async fn poll<T>(
    timeout: Duration,
    interval: Duration,
    mut check: impl AsyncFnMut() -> Result<Step<T>, KubectlError>,
) -> Result<Outcome<T>, KubectlError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_seen = match check().await? {
            Step::Done(v) => return Ok(Outcome::Done(v)),
            Step::Pending(seen) => seen,
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(Outcome::TimedOut { last_seen });
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
    }
}
