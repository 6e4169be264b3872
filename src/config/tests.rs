//! The CLI definition, secret handling and the start-up checks clap cannot make alone.

use super::*;
use clap::CommandFactory;

#[test]
fn the_cli_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn a_bare_invocation_serves_and_openapi_is_a_subcommand() {
    let cli = Cli::try_parse_from(["aitier", "--port", "9000"]).unwrap();
    assert!(matches!(cli.into_command(), Command::Serve(a) if a.port == 9000));
    let cli = Cli::try_parse_from(["aitier", "openapi"]).unwrap();
    assert!(matches!(cli.into_command(), Command::Openapi));
}

#[test]
fn secrets_never_reach_debug_output() {
    let cli = Cli::try_parse_from(["aitier", "--hf-token", "hf_supersecret"]).unwrap();
    let shown = format!("{:?}", cli.serve);
    assert!(!shown.contains("hf_supersecret"), "{shown}");
    assert!(shown.contains("redacted"));
}

#[test]
fn help_never_shows_the_value_of_a_secret_from_the_environment() {
    let command = Cli::command();
    // Whole words of the variable's name: AITIER_MAX_BATCH_TOKENS is no secret.
    let secret = |name: &str| {
        name.split('_')
            .any(|word| ["KEY", "KEYS", "TOKEN", "SECRET", "PASSWORD", "URL"].contains(&word))
    };
    let mut checked = 0;
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
            continue;
        };
        if secret(env) {
            checked += 1;
            assert!(
                arg.is_hide_env_values_set(),
                "{env}'s value shows in --help"
            );
        }
    }
    assert!(checked >= 5, "only {checked} secret arguments found");
}

#[test]
fn listening_beyond_loopback_needs_keys_or_allow_anonymous() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["aitier", "--host", "0.0.0.0"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().serve.validate()
    };
    let refused = parse(&[]).unwrap_err();
    assert!(refused.contains("--allow-anonymous"), "{refused}");
    assert!(parse(&["--allow-anonymous"]).is_ok());
    assert!(parse(&["--api-keys", "0123456789abcdef0123"]).is_ok());
    assert!(
        Cli::try_parse_from(["aitier"])
            .unwrap()
            .serve
            .validate()
            .is_ok()
    );
}

#[test]
fn a_public_upstream_must_name_its_models() {
    let argv = |models: &'static str| {
        let mut argv = vec!["aitier", "--host", "0.0.0.0", "--allow-anonymous"];
        argv.extend(["--openai-api-key", "sk-test"]);
        if !models.is_empty() {
            argv.extend(["--upstream-models", models]);
        }
        Cli::try_parse_from(argv).unwrap().serve.validate()
    };
    assert!(argv("").unwrap_err().contains("--upstream-models"));
    assert!(argv("gpt-4o-mini").is_ok());
    assert!(argv("*").is_ok());
}

#[test]
fn credentials_with_a_wildcard_origin_are_refused() {
    let cli = Cli::try_parse_from(["aitier", "--cors-origins", "*", "--cors-credentials"]).unwrap();
    assert!(cli.serve.validate().is_err());
}
