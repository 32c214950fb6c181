//! Fault injection for crash-safety and failover tests: fail the N-th call, or every call
//! of a named operation, with an injected error or a device loss.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

/// What an injected fault looks like to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A generic failure (stands for a crash at that point).
    Injected,
    /// The token disappeared.
    DeviceUnavailable,
}

#[derive(Clone, Debug)]
struct Rule {
    op: Option<&'static str>,
    /// Matching calls to let through before failing.
    skip: u64,
    /// Failures left; None = until cleared (a process that died stays dead).
    remaining: Option<u64>,
    kind: FaultKind,
}

/// Shared, thread-safe fault schedule. Operation names are those of the layer that
/// consults it: `find`, `read`, `create`, `destroy` inside the PKCS#11 store; `get`,
/// `put`, `delete`, `manifest`, `apply`, `health` for [`super::FaultyStore`].
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<Rule>>,
    calls: AtomicU64,
    /// Calls per operation since the last clear.
    by_op: Mutex<std::collections::HashMap<&'static str, u64>>,
}

impl FaultPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// From the `n`-th call on (1-based, any operation), every call fails: a crash at
    /// that step, with nothing after it running.
    pub fn crash_at_call(&self, n: u64) {
        self.push(Rule {
            op: None,
            skip: n.saturating_sub(1),
            remaining: None,
            kind: FaultKind::Injected,
        });
    }

    /// Every call of `op` fails with `kind` until cleared.
    pub fn fail_op(&self, op: &'static str, kind: FaultKind) {
        self.push(Rule {
            op: Some(op),
            skip: 0,
            remaining: None,
            kind,
        });
    }

    /// The next `times` calls of `op` fail with `kind`.
    pub fn fail_op_times(&self, op: &'static str, times: u64, kind: FaultKind) {
        self.push(Rule {
            op: Some(op),
            skip: 0,
            remaining: Some(times),
            kind,
        });
    }

    /// Removes every rule and resets the call count.
    pub fn clear(&self) {
        self.lock().clear();
        self.calls.store(0, Ordering::SeqCst);
        self.by_op.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Calls seen since the last clear.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls of `op` seen since the last clear.
    pub fn calls_of(&self, op: &str) -> u64 {
        let by_op = self.by_op.lock().unwrap_or_else(|p| p.into_inner());
        by_op.get(op).copied().unwrap_or(0)
    }

    /// Consulted before each operation.
    pub fn check(&self, op: &'static str, token: &str) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self
            .by_op
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(op)
            .or_default() += 1;
        let mut rules = self.lock();
        for rule in rules.iter_mut() {
            if rule.op.is_some_and(|o| o != op) || rule.remaining == Some(0) {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if let Some(n) = rule.remaining.as_mut() {
                *n -= 1;
            }
            return Err(match rule.kind {
                FaultKind::Injected => StoreError::Injected { operation: op },
                FaultKind::DeviceUnavailable => StoreError::DeviceUnavailable {
                    token: token.to_string(),
                    detail: format!("fault injected into {op}"),
                },
            });
        }
        Ok(())
    }

    fn push(&self, rule: Rule) {
        self.lock().push(rule);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_is_sticky_from_the_nth_call() {
        let plan = FaultPlan::new();
        plan.crash_at_call(3);
        assert!(plan.check("a", "t").is_ok());
        assert!(plan.check("b", "t").is_ok());
        assert!(plan.check("c", "t").is_err());
        assert!(plan.check("d", "t").is_err());
        plan.clear();
        assert!(plan.check("e", "t").is_ok());
    }

    #[test]
    fn named_operation_fails_a_number_of_times() {
        let plan = FaultPlan::new();
        plan.fail_op_times("put", 2, FaultKind::DeviceUnavailable);
        assert!(plan.check("get", "t").is_ok());
        assert!(matches!(
            plan.check("put", "t"),
            Err(StoreError::DeviceUnavailable { .. })
        ));
        assert!(plan.check("put", "t").is_err());
        assert!(plan.check("put", "t").is_ok());
    }
}
