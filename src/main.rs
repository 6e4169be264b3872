//! The `aitier` binary: parse the configuration, set up tracing, then serve or print the OpenAPI
//! document.

use clap::Parser;

use aitier::config::{ClassifierCommand, Cli, Command, RagCommand, ServeArgs};

fn main() -> anyhow::Result<()> {
    // A missing .env is the normal case; a malformed one is worth a warning once tracing is up.
    let dotenv = dotenvy::dotenv();
    let cli = Cli::parse();
    match cli.into_command() {
        Command::Openapi => {
            println!("{}", aitier::http::openapi().to_pretty_json()?);
            Ok(())
        }
        Command::Classifier(command) => {
            // Fine-tuning runs one step at a time and wants every core inside each op.
            if !matches!(&command, ClassifierCommand::Train(args) if args.tune_layers > 0) {
                aitier::inference::use_one_compute_thread_per_worker();
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            match command {
                ClassifierCommand::Train(args) => runtime.block_on(aitier::commands::train(args)),
                ClassifierCommand::Eval(args) => runtime.block_on(aitier::commands::eval(args)),
                ClassifierCommand::Calibrate(args) => {
                    runtime.block_on(aitier::commands::calibrate(args))
                }
            }
        }
        Command::Ingest(args) => {
            aitier::inference::use_one_compute_thread_per_worker();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let failed = runtime.block_on(aitier::commands::ingest(args))?;
            if failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Rag(RagCommand::Eval(args)) => {
            aitier::inference::use_one_compute_thread_per_worker();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(aitier::commands::rag_eval(args))
        }
        Command::Serve(args) => {
            args.max_isa.apply();
            // Before the runtime starts its threads: it changes the environment.
            aitier::inference::use_one_compute_thread_per_worker();
            aitier::telemetry::init(args.log_format);
            if let Err(e) = dotenv.as_ref()
                && !e.not_found()
            {
                tracing::warn!(error = %e, "could not read .env");
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(args))
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing::info!(config = ?args, "starting aitier");
    let shutdown = aitier::server::shutdown_signal();
    let server = aitier::server::bind(&args).await?;
    server.run(shutdown).await
}
