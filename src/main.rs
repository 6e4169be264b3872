//! The `aitier` binary: parse the configuration, set up tracing, then serve or print the OpenAPI
//! document.

use clap::Parser;

use aitier::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A missing .env is the normal case; a malformed one is worth a warning once tracing is up.
    let dotenv = dotenvy::dotenv();
    let cli = Cli::parse();
    match cli.into_command() {
        Command::Openapi => {
            println!("{}", aitier::http::openapi().to_pretty_json()?);
            Ok(())
        }
        Command::Serve(args) => {
            aitier::telemetry::init(args.log_format);
            if let Err(e) = dotenv.as_ref() {
                if !e.not_found() {
                    tracing::warn!(error = %e, "could not read .env");
                }
            }
            tracing::info!(config = ?args, "starting aitier");
            let server = aitier::server::bind(&args).await?;
            server.run(aitier::server::shutdown_signal()).await
        }
    }
}
