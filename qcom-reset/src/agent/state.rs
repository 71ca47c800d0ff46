//! The state file: per-device attempt history, rewritten atomically after every attempt.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::policy::History;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub devices: BTreeMap<String, History>,
}

#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {why}; fix or remove it (the agent then starts with no history)")]
pub struct StateError {
    pub path: PathBuf,
    pub why: String,
}

impl State {
    pub fn load(path: &Path) -> Result<State, StateError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StateError {
                path: path.into(),
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(StateError {
                path: path.into(),
                why: e.to_string(),
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = |e: std::io::Error| StateError {
            path: path.into(),
            why: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).expect("state serializes"),
        )
        .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}
