//! API keys and their scopes: parsed from `AITIER_API_KEYS` (a comma list or `@file`), looked up in
//! constant time, never printed. Knows nothing of HTTP.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do. `Admin` implies the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Embed, classify, chat, search, query, list.
    Read,
    /// Ingest and delete documents.
    Write,
    /// Everything, including the operator's routes (`/metrics` when it is not open).
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The caller a valid key identifies: its position in the configuration (what rate limits are
/// counted against; the key itself is never kept outside [`ApiKeys`]) and its scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub usize);

struct Entry {
    /// SHA-256 of the key: comparing fixed-length digests in constant time hides both the
    /// key's bytes and its length from timing.
    digest: [u8; 32],
    scopes: Vec<Scope>,
}

/// The configured keys.
pub struct ApiKeys {
    entries: Vec<Entry>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys, redacted)", self.entries.len())
    }
}

impl ApiKeys {
    /// Parses `KEY[:scope[+scope..]]` entries, comma separated, or `@PATH` for a file with one
    /// entry per line (blank lines and `#` comments skipped). A key without scopes is read+write.
    /// Errors never quote a key.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let text;
        let entries: Vec<&str> = match spec.trim().strip_prefix('@') {
            Some(path) => {
                text = std::fs::read_to_string(path)
                    .map_err(|e| format!("could not read the API key file {path}: {e}"))?;
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect()
            }
            None => spec
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .collect(),
        };
        let mut keys = Vec::with_capacity(entries.len());
        for (n, entry) in entries.iter().enumerate() {
            let (key, scopes) = match entry.rsplit_once(':') {
                Some((key, scopes)) => {
                    let parsed: Option<Vec<Scope>> = scopes.split('+').map(Scope::parse).collect();
                    let parsed = parsed.ok_or_else(|| {
                        format!(
                            "API key #{}: scopes must be read, write or admin joined by '+'",
                            n + 1
                        )
                    })?;
                    (key.trim(), parsed)
                }
                None => (*entry, vec![Scope::Read, Scope::Write]),
            };
            if key.len() < 16 {
                return Err(format!(
                    "API key #{} is shorter than 16 characters: use a long random key (e.g. `openssl rand -hex 24`)",
                    n + 1
                ));
            }
            keys.push(Entry {
                digest: Sha256::digest(key.as_bytes()).into(),
                scopes,
            });
        }
        if keys.is_empty() {
            return Err("AITIER_API_KEYS holds no key".into());
        }
        Ok(Self { entries: keys })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The key's id, when `presented` is one of the keys. Every entry is compared, in constant
    /// time, whichever matches.
    pub fn find(&self, presented: &str) -> Option<KeyId> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (i, entry) in self.entries.iter().enumerate() {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(KeyId(i));
            }
        }
        found
    }

    /// Whether the key may act with `scope`.
    pub fn allows(&self, id: KeyId, scope: Scope) -> bool {
        let scopes = &self.entries[id.0].scopes;
        scopes.contains(&Scope::Admin) || scopes.contains(&scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn bare_keys_read_and_write_and_scoped_keys_do_what_they_say() {
        let keys = ApiKeys::parse(&format!("{A}, {B}:read")).unwrap();
        let a = keys.find(A).unwrap();
        let b = keys.find(B).unwrap();
        assert!(keys.allows(a, Scope::Read) && keys.allows(a, Scope::Write));
        assert!(!keys.allows(a, Scope::Admin));
        assert!(keys.allows(b, Scope::Read) && !keys.allows(b, Scope::Write));
        assert!(keys.find("cccccccccccccccccccc").is_none());
        assert!(keys.find("").is_none());
    }

    #[test]
    fn admin_allows_everything() {
        let keys = ApiKeys::parse(&format!("{A}:admin")).unwrap();
        let a = keys.find(A).unwrap();
        for scope in [Scope::Read, Scope::Write, Scope::Admin] {
            assert!(keys.allows(a, scope));
        }
    }

    #[test]
    fn keys_come_from_a_file_one_per_line() {
        let path = std::env::temp_dir().join(format!("aitier-keys-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("# team keys\n{A}:read+write\n\n{B}:admin\n")).unwrap();
        let keys = ApiKeys::parse(&format!("@{}", path.display())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.allows(keys.find(B).unwrap(), Scope::Admin));
    }

    #[test]
    fn bad_entries_are_refused_without_quoting_the_key() {
        let error = ApiKeys::parse(&format!("{A}:superuser")).unwrap_err();
        assert!(!error.contains(A), "{error}");
        let error = ApiKeys::parse("short").unwrap_err();
        assert!(
            !error.contains("short\"") && error.contains("16"),
            "{error}"
        );
        assert!(ApiKeys::parse(" , ").is_err());
        assert!(!format!("{:?}", ApiKeys::parse(A).unwrap()).contains(A));
    }
}
