//! Reading the configuration: the file, its drop-ins merged in name order, each file checked
//! on its own so an error names the file, line and column.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bdf::Bdf;

use super::Config;

/// `conf.d/*.toml` beside the configuration file, in name order, dot files left out (none
/// when the directory is missing).
fn drop_ins(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = path.parent().unwrap_or(Path::new(".")).join("conf.d");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(ConfigError::Read { path: dir, err }),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        // Editors' and configuration tools' temporaries (`.#x.toml`, `.ansible_tmp…`).
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Merges a drop-in into what came before: tables merge key by key, arrays of tables
/// (`[[device]]`) add, everything else is replaced.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (Some(toml::Value::Array(a)), toml::Value::Array(b))
                if !b.is_empty() && b.iter().all(toml::Value::is_table) =>
            {
                a.extend(b);
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It cannot be read.
    #[error("cannot read {path}: {err}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// It is not valid TOML for the configuration.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// The column, from 1.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads `path` and the drop-ins of `conf.d/*.toml` beside it (name order; a later file's
    /// keys replace earlier ones, its `[devices."…"]` tables merge, its `[[device]]` rules
    /// add). A missing file at the default path means all defaults; each file must be valid on
    /// its own, so an error names the file, line and column.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|err| ConfigError::Read {
                path: p.to_path_buf(),
                err,
            })
        };
        let main = match read(path) {
            Ok(t) => Some(t),
            Err(ConfigError::Read { err, .. })
                if err.kind() == std::io::ErrorKind::NotFound && !explicit =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        let mut files = Vec::new();
        if let Some(t) = main {
            files.push((path.to_path_buf(), t));
        }
        for p in drop_ins(path)? {
            let t = read(&p)?;
            files.push((p, t));
        }
        match files.as_slice() {
            [] => Ok(Config::default()),
            [(p, t)] => Config::parse(t, p),
            _ => {
                let mut merged = toml::Table::new();
                for (p, t) in &files {
                    Config::parse(t, p)?;
                    merge(&mut merged, toml::from_str(t).expect("parsed above"));
                }
                let last = &files.last().expect("two or more").0;
                let cfg = Config::deserialize(merged).map_err(|e| ConfigError::Invalid {
                    path: last.clone(),
                    message: format!("with the drop-ins merged: {e}"),
                })?;
                cfg.validate().map_err(|message| ConfigError::Invalid {
                    path: last.clone(),
                    message,
                })?;
                Ok(cfg)
            }
        }
    }

    /// Parses `text`, the contents of `path`, and checks it.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().replace('\n', " "),
            }
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1 (use observe_only to never act)".into());
        }
        for (addr, d) in &self.devices {
            addr.parse::<Bdf>()
                .map_err(|e| format!("[devices.\"{addr}\"]: {e}"))?;
            if let Some(p) = &d.profile
                && crate::device::by_name(p).is_none()
            {
                return Err(format!(
                    "[devices.\"{addr}\"]: unknown profile {p:?}; known: {}",
                    crate::device::profile_names()
                ));
            }
            if d.bar.is_some_and(|b| b > 5) {
                return Err(format!("[devices.\"{addr}\"]: bar must be 0-5"));
            }
        }
        for (i, r) in self.device.iter().enumerate() {
            let at = format!("[[device]] #{} (ids = {:?})", i + 1, r.ids);
            r.parse_ids().map_err(|e| format!("{at}: {e}"))?;
            if crate::device::by_name(&r.profile).is_none() {
                return Err(format!(
                    "{at}: unknown profile {:?}; known: {}",
                    r.profile,
                    crate::device::profile_names()
                ));
            }
            if r.bar.is_some_and(|b| b > 5) {
                return Err(format!("{at}: bar must be 0-5"));
            }
        }
        let unknown = self.experimental.unknown();
        if !unknown.is_empty() {
            return Err(format!(
                "experimental: {unknown:?} are not experimental profiles; use \"all\" or some of: {}",
                crate::device::experimental_names()
            ));
        }
        Ok(())
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}
