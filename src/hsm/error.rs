//! The store's error type: one variant per thing a caller can act on.

use std::time::Duration;

/// Errors of the secret store. Messages name the token, the path and the fix; they never
/// carry secret bytes or PINs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("secret {path} not found on token {token:?}")]
    NotFound { token: String, path: String },

    #[error(
        "secret {path} on token {token:?} is at version {actual}, not the expected {expected}; re-read it and retry the write"
    )]
    VersionConflict {
        token: String,
        path: String,
        expected: String,
        actual: String,
    },

    #[error(
        "token {token:?} is unavailable ({detail}); check that the HSM is plugged in and the PKCS#11 module can see it; the next call reconnects"
    )]
    DeviceUnavailable { token: String, detail: String },

    #[error(
        "the PIN for token {token:?} is incorrect; check the PIN file (the token may lock after more failures)"
    )]
    PinIncorrect { token: String },

    #[error(
        "the user PIN of token {token:?} is locked; unlock it with the SO PIN (e.g. softhsm2-util or the vendor tool)"
    )]
    PinLocked { token: String },

    #[error(
        "token {token:?} allows one more user-PIN attempt before it locks; hsm-secrets does not log in automatically now: check the PIN file, then log in once by hand (e.g. pkcs11-tool --login) to reset the counter"
    )]
    PinFinalTry { token: String },

    #[error(
        "token {token:?} refused the PIN in {pin_file} (CKR_PIN_INCORRECT); that PIN is not offered to the token again, so the token's attempts are not worn down: put the right PIN in the PIN Secret, and the next PIN read is tried"
    )]
    PinRefused { token: String, pin_file: String },

    #[error(
        "token {token:?} has handed out every change sequence number; no further write can be ordered (this only happens after a record with a forged sequence was stored)"
    )]
    SequenceExhausted { token: String },

    #[error("no token labelled {label:?} in {library}; tokens present: {present}")]
    TokenNotFound {
        label: String,
        library: String,
        present: String,
    },

    #[error(
        "secret {path} is corrupt: {detail}; a mirror repairs it from the primary on its next verification pass"
    )]
    Corrupt { path: String, detail: String },

    #[error("invalid {what} {name:?}: {why}")]
    InvalidName {
        what: &'static str,
        name: String,
        why: String,
    },

    #[error(
        "{operation} on token {token:?} did not finish within {timeout:?}; the HSM may be overloaded or hung"
    )]
    Timeout {
        token: String,
        operation: &'static str,
        timeout: Duration,
    },

    #[error("cannot read the PIN file {path}: {detail}")]
    PinFile { path: String, detail: String },

    #[error("cannot load PKCS#11 module {library}: {detail}")]
    Library { library: String, detail: String },

    #[error("PKCS#11 {function} failed on token {token:?}: {rv}")]
    Pkcs11 {
        token: String,
        function: String,
        rv: String,
    },

    #[cfg(feature = "fault-injection")]
    #[error("fault injected into {operation}")]
    Injected { operation: &'static str },
}

impl StoreError {
    /// A bounded label for metrics and Events (never error text).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::VersionConflict { .. } => "version_conflict",
            StoreError::DeviceUnavailable { .. } => "device_unavailable",
            StoreError::PinIncorrect { .. } => "pin_incorrect",
            StoreError::PinLocked { .. } => "pin_locked",
            StoreError::PinFinalTry { .. } => "pin_final_try",
            StoreError::PinRefused { .. } => "pin_refused",
            StoreError::SequenceExhausted { .. } => "sequence_exhausted",
            StoreError::TokenNotFound { .. } => "token_not_found",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::InvalidName { .. } => "invalid_name",
            StoreError::Timeout { .. } => "timeout",
            StoreError::PinFile { .. } => "pin_file",
            StoreError::Library { .. } => "library",
            StoreError::Pkcs11 { .. } => "pkcs11",
            #[cfg(feature = "fault-injection")]
            StoreError::Injected { .. } => "injected",
        }
    }

    /// Whether retrying later (after reconnecting) can help.
    pub fn is_transient(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        if let StoreError::Injected { .. } = self {
            return true;
        }
        matches!(
            self,
            StoreError::DeviceUnavailable { .. }
                | StoreError::Timeout { .. }
                | StoreError::TokenNotFound { .. }
        )
    }
}
