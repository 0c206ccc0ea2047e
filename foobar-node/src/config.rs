//! Configuration files: TOML, read whole, refused whole with the field at fault named.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A refused configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A field is missing, unknown, of the wrong type or out of range.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted path of the field, e.g. `proxy.upstreams[1]`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// The field at fault, if the file was read.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Read { .. } => None,
        }
    }
}

/// A field that failed validation after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    /// A refusal of `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A configuration that checks itself after parsing.
pub trait Validate {
    /// Refuses the first bad field.
    fn validate(&self) -> Result<(), Invalid>;
}

/// Reads and validates a configuration file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates configuration text; `path` only names it in errors.
pub fn parse<T: DeserializeOwned + Validate>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        field,
        message,
    };
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| invalid("(syntax)".into(), e.message().to_owned()))?;
    let config: T = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(top level)".into()
        } else {
            field
        };
        invalid(field, e.into_inner().message().to_owned())
    })?;
    config
        .validate()
        .map_err(|Invalid { field, message }| invalid(field, message))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        ports: Vec<u16>,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), Invalid> {
            if self.name.is_empty() {
                return Err(Invalid::new("name", "must not be empty"));
            }
            Ok(())
        }
    }

    fn field_of(text: &str) -> String {
        parse::<Sample>(text, Path::new("x.toml"))
            .unwrap_err()
            .field()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(
            field_of("name = 'a'\n[inner]\nports = [1, 70000]"),
            "inner.ports[1]"
        );
        assert_eq!(
            field_of("name = 'a'\n[inner]\nports = []\ncolour = 1"),
            "inner.colour"
        );
        assert_eq!(field_of("name = ''\n[inner]\nports = []"), "name");
        assert_eq!(field_of("name = 'a'\n[inner"), "(syntax)");
        let ok = parse::<Sample>("name = 'a'\n[inner]\nports = [80]", Path::new("x")).unwrap();
        assert_eq!(
            (ok.name.as_str(), ok.inner.ports.as_slice()),
            ("a", &[80][..])
        );
    }
}
