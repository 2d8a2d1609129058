//! The one way the daemon and every CLI command reach the device: check the `[backend]` section
//! with the backend it names ([`Settings::from_config`]), then [`open`] it for a [`Purpose`].
//! Callers then hold a [`SharedBackend`] and never name a concrete backend; what differs
//! between the daemon and a tool is the purpose, not a match on backend kinds.

use std::path::{Path, PathBuf};

use super::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use super::tpm::{TpmBackend, TpmSettings};
use super::SharedBackend;
use crate::config::{BackendConfig, Config, ConfigError};

/// A `[backend]` section its backend has checked: files present, secrets readable by this user
/// only, counts in range. Reading it reads the PIN or owner authorization.
pub enum Settings {
    Pkcs11(Pkcs11Settings),
    Tpm(TpmSettings),
}

impl Settings {
    /// An error names the config file like any other configuration error, so the daemon reports
    /// it (and exits 64) the same way, before it binds a port or touches the device.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let checked = match &config.backend {
            BackendConfig::Pkcs11(c) => {
                Pkcs11Settings::from_config(c, config.workers).map(Settings::Pkcs11)
            }
            BackendConfig::Tpm(c) => TpmSettings::from_config(c).map(Settings::Tpm),
        };
        checked.map_err(|message| ConfigError::new(&config.path, message))
    }
}

/// Who opens the device, which decides how much of it to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `tillkeyd`, the device's main user: the configured session or context count, and a TPM's
    /// objects left loaded by dead processes are reclaimed (at start and each reconnect).
    Daemon,
    /// A CLI command working on the device directly (`provision init`, `audit verify`, a
    /// device-held CA), possibly beside a running daemon: one TPM context, and nothing the
    /// daemon has loaded is reclaimed.
    Tool,
}

/// What the daemon's start line says about the device it opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenedDevice {
    Pkcs11 {
        token_label: String,
        sessions: usize,
    },
    Tpm {
        tcti: String,
        contexts: usize,
    },
}

impl OpenedDevice {
    /// Sessions or contexts open: at most this many device calls run at once.
    pub fn pool_size(&self) -> usize {
        match self {
            OpenedDevice::Pkcs11 { sessions, .. } => *sessions,
            OpenedDevice::Tpm { contexts, .. } => *contexts,
        }
    }
}

/// An opened backend. Call [`close`](super::KeyBackend::close) on it before the process exits: a TPM without
/// resource manager would otherwise keep its objects loaded.
pub struct Opened {
    pub backend: SharedBackend,
    pub device: OpenedDevice,
}

impl Opened {
    /// Whether calls wait on the device (see
    /// [`KeyBackend::waits_on_device`](super::KeyBackend::waits_on_device)).
    pub fn waits_on_device(&self) -> bool {
        self.backend.waits_on_device()
    }
}

/// Connect now (a daemon that cannot reach its device at start refuses to start, so a wrong PIN
/// or URI is seen at once) and start the backend's supervisor. Blocks for the connection.
pub fn open(settings: Settings, purpose: Purpose) -> Result<Opened, String> {
    match settings {
        Settings::Pkcs11(settings) => {
            let opened = Pkcs11Backend::open(settings)?;
            let device = OpenedDevice::Pkcs11 {
                token_label: opened.token_label().unwrap_or_default(),
                sessions: opened.session_count(),
            };
            Ok(Opened {
                backend: opened,
                device,
            })
        }
        Settings::Tpm(mut settings) => {
            if purpose == Purpose::Tool {
                settings.contexts = 1;
            }
            let opened = TpmBackend::open(settings, purpose == Purpose::Daemon)?;
            let device = OpenedDevice::Tpm {
                tcti: opened.tcti().to_owned(),
                contexts: opened.context_count(),
            };
            Ok(Opened {
                backend: opened,
                device,
            })
        }
    }
}

/// `path` (already absolute) if it exists; the error names the config `field`.
pub(super) fn existing_file(field: &str, path: &Path) -> Result<PathBuf, String> {
    std::fs::metadata(path).map_err(|e| format!("{field} = '{}': {e}", path.display()))?;
    Ok(path.to_path_buf())
}
