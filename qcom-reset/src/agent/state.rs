//! The state file: per-device attempt history, rewritten atomically after every attempt.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::policy::History;

/// The agent's state file: each card's attempt history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// History by card address.
    pub devices: BTreeMap<String, History>,
}

/// The state file cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {why}; fix or remove it (the agent then starts with no history)")]
pub struct StateError {
    /// The state file.
    pub path: PathBuf,
    /// What went wrong.
    pub why: StateFailure,
}

/// What went wrong with the state file.
#[derive(Debug)]
pub enum StateFailure {
    /// It cannot be read.
    Read(std::io::Error),
    /// It does not parse and cannot be moved aside either.
    Aside {
        /// The parser's error.
        parse: serde_json::Error,
        /// Why the rename failed.
        rename: std::io::Error,
    },
    /// The record store's write failed.
    Save(Box<crate::Error>),
}

impl std::fmt::Display for StateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateFailure::Read(e) => write!(f, "{e}"),
            StateFailure::Aside { parse, rename } => {
                write!(f, "{parse}, and it cannot be moved aside: {rename}")
            }
            StateFailure::Save(e) => write!(f, "{e}"),
        }
    }
}

impl State {
    /// The history, or none: a file that does not parse (torn by a power loss before it was
    /// fsynced, or edited by hand) is moved aside with a warning instead of keeping the agent
    /// from starting, in a restart loop, on every host it runs on. An unreadable file is still
    /// an error: its contents are unknown.
    pub fn load(path: &Path) -> Result<State, StateError> {
        let err = |why| StateError {
            path: path.into(),
            why,
        };
        match std::fs::read(path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => Ok(s),
                Err(e) => {
                    let aside = path.with_extension("corrupt");
                    if let Err(rename) = std::fs::rename(path, &aside) {
                        return Err(err(StateFailure::Aside { parse: e, rename }));
                    }
                    tracing::warn!(
                        "state file {} is corrupt ({e}); moved to {}, starting with no history",
                        path.display(),
                        aside.display()
                    );
                    Ok(State::default())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(err(StateFailure::Read(e))),
        }
    }

    /// Through the one record store: atomic and fsynced.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        crate::session::record::store(path, self).map_err(|e| StateError {
            path: path.into(),
            why: StateFailure::Save(Box::new(e)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17 item 5: a torn state file is moved aside and the agent starts; the history
    /// written after that is durable and read back.
    #[test]
    fn a_corrupt_state_file_is_moved_aside_not_fatal() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.json");
        std::fs::write(&p, b"{\"devices\": {\"0000:03").unwrap();
        assert_eq!(State::load(&p).unwrap(), State::default());
        assert!(t.path().join("state.corrupt").exists() && !p.exists());
        let mut s = State::default();
        s.devices.insert("0000:03:00.0".into(), History::default());
        s.save(&p).unwrap();
        assert_eq!(State::load(&p).unwrap(), s);
    }
}
