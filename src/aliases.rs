//! Model aliases: the names a frontend written for OpenAI sends (`gpt-4o-mini`,
//! `text-embedding-3-small`), answered by the models this server has. An alias resolves once, at
//! the edge of every route that takes a model name; answers name the model that answered.

/// `alias → model` pairs, from `--model-aliases`.
#[derive(Debug, Clone, Default)]
pub struct ModelAliases {
    pairs: Vec<(String, String)>,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AliasError {
    #[error("--model-aliases entries are alias=model, not '{0}'")]
    Malformed(String),
    #[error("--model-aliases names '{0}' twice")]
    Duplicate(String),
    #[error("--model-aliases: '{alias}' names '{model}', itself an alias; name the model")]
    Chain { alias: String, model: String },
    #[error("--model-aliases: '{0}' is an alias of itself")]
    Itself(String),
    #[error(
        "--model-aliases: '{alias}' names '{model}', which this server does not serve ({served})"
    )]
    Unserved {
        alias: String,
        model: String,
        served: String,
    },
    #[error("--model-aliases: '{0}' is already the name of a served model")]
    Shadows(String),
}

impl ModelAliases {
    /// Parses `alias=model` entries (blank entries are skipped).
    pub fn parse(entries: &[String]) -> Result<Self, AliasError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let Some((alias, model)) = entry.split_once('=') else {
                return Err(AliasError::Malformed(entry.into()));
            };
            let (alias, model) = (alias.trim(), model.trim());
            if alias.is_empty() || model.is_empty() {
                return Err(AliasError::Malformed(entry.into()));
            }
            if alias == model {
                return Err(AliasError::Itself(alias.into()));
            }
            if pairs.iter().any(|(a, _)| a == alias) {
                return Err(AliasError::Duplicate(alias.into()));
            }
            pairs.push((alias.into(), model.into()));
        }
        if let Some((alias, model)) = pairs
            .iter()
            .find(|(_, model)| pairs.iter().any(|(a, _)| a == model))
        {
            return Err(AliasError::Chain {
                alias: alias.clone(),
                model: model.clone(),
            });
        }
        Ok(Self { pairs })
    }

    /// Checks that every alias names a model `local` lists or `upstream` accepts, and hides none
    /// of the local models.
    pub fn check(&self, local: &[&str], upstream: impl Fn(&str) -> bool) -> Result<(), AliasError> {
        for (alias, model) in &self.pairs {
            if !local.contains(&model.as_str()) && !upstream(model) {
                return Err(AliasError::Unserved {
                    alias: alias.clone(),
                    model: model.clone(),
                    served: local.join(", "),
                });
            }
            if local.contains(&alias.as_str()) {
                return Err(AliasError::Shadows(alias.clone()));
            }
        }
        Ok(())
    }

    /// The model `name` stands for: its target when it is an alias, else itself.
    pub fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        self.pairs
            .iter()
            .find(|(alias, _)| alias == name)
            .map_or(name, |(_, model)| model)
    }

    /// Each alias with the model it names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(a, m)| (a.as_str(), m.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> Result<ModelAliases, AliasError> {
        ModelAliases::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn aliases_resolve_once_and_other_names_pass_through() {
        let aliases =
            parse(&[" gpt-4o-mini = Smol ", "", "text-embedding-3-small=MiniLM"]).unwrap();
        assert_eq!(aliases.resolve("gpt-4o-mini"), "Smol");
        assert_eq!(aliases.resolve("text-embedding-3-small"), "MiniLM");
        assert_eq!(aliases.resolve("Smol"), "Smol");
        assert_eq!(aliases.resolve("gpt-4"), "gpt-4");
        assert_eq!(aliases.iter().count(), 2);
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry_named() {
        assert_eq!(
            parse(&["gpt"]).unwrap_err(),
            AliasError::Malformed("gpt".into())
        );
        assert_eq!(
            parse(&["=x"]).unwrap_err(),
            AliasError::Malformed("=x".into())
        );
        assert_eq!(parse(&["a=a"]).unwrap_err(), AliasError::Itself("a".into()));
        assert_eq!(
            parse(&["a=x", "a=y"]).unwrap_err(),
            AliasError::Duplicate("a".into())
        );
        assert!(matches!(
            parse(&["a=b", "b=c"]),
            Err(AliasError::Chain { .. })
        ));
    }

    #[test]
    fn an_alias_must_name_a_served_model_and_hide_none() {
        let local = ["Smol", "MiniLM"];
        let upstream = |name: &str| name.starts_with("gpt-");
        let ok = parse(&["gpt-4o-mini=Smol", "fast=gpt-4o"]).unwrap();
        assert!(ok.check(&local, upstream).is_ok());
        let unserved = parse(&["gpt-4o-mini=Llama"]).unwrap();
        assert!(matches!(
            unserved.check(&local, upstream),
            Err(AliasError::Unserved { .. })
        ));
        let shadows = parse(&["MiniLM=Smol"]).unwrap();
        assert_eq!(
            shadows.check(&local, upstream).unwrap_err(),
            AliasError::Shadows("MiniLM".into())
        );
    }
}
