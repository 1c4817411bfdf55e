//! Thin entry point: parse → validate → run → print the result or one error line → exit code.
//! The sandbox is resumed on every way out: success, error, panic, SIGTERM and SIGINT.

use clap::Parser;
use committer::cli::{Cli, Command, LogFormat, LogLevel};
use committer::error::{exit, CommitError};
use committer::{freeze, log, report};

fn main() {
    committer::supervise::enter();
    let cli = Cli::parse();
    log::init(
        match cli.log_level {
            LogLevel::Error => 0,
            LogLevel::Warn => 1,
            LogLevel::Info => 2,
            LogLevel::Debug => 3,
        },
        match cli.log_format {
            LogFormat::Auto => None,
            LogFormat::Text => Some(false),
            LogFormat::Json => Some(true),
        },
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("committer: cannot start the async runtime: {e}");
            std::process::exit(exit::INTERNAL);
        }
    };
    let code = runtime.block_on(run(cli.command));
    // Don't wait for blocking readers that an interrupt left behind.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}

async fn run(command: Command) -> i32 {
    let mut work = tokio::spawn(async move {
        match command {
            Command::Commit(args) => {
                let plan = args.plan().map_err(usage)?;
                let result = committer::commit::commit(&plan).await.map_err(failure)?;
                let json = serde_json::to_string(&result).expect("result serialises");
                println!("{json}");
                if let Some(path) = &plan.result_file {
                    if let Err(e) = report::write_result_file(path, &json) {
                        log::warn(&format!("writing the result to {}: {e}", path.display()));
                    }
                }
                Ok(())
            }
            Command::Diff(args) => {
                let plan = args.plan().map_err(usage)?;
                let desc = committer::commit::diff_to_file(&plan, &args.output)
                    .await
                    .map_err(failure)?;
                println!(
                    "{}",
                    serde_json::to_string(&desc).expect("descriptor serialises")
                );
                Ok(())
            }
        }
    });
    let code = tokio::select! {
        joined = &mut work => match joined {
            Ok(Ok(())) => 0,
            Ok(Err(code)) => code,
            Err(e) => { log::error(&format!("internal error: {e}")); exit::INTERNAL }
        },
        sig = interrupted() => {
            // Stop the commit at its next await: no blob, manifest or tag goes out after this.
            // Its lease is left to the guardian, which deletes it once this process is gone.
            work.abort();
            let _ = work.await;
            failure(CommitError::Interrupted(sig))
        }
    };
    if let Err(e) = freeze::resume_if_paused().await {
        log::error(&format!("could not resume the container: {e}"));
    }
    code
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn usage(e: committer::cli::UsageError) -> i32 {
    eprintln!("committer: {e}");
    exit::USAGE
}

fn failure(e: CommitError) -> i32 {
    let mut line = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s = s.to_string();
        if !line.contains(&s) {
            line.push_str(": ");
            line.push_str(&s);
        }
        source = s_next(source);
    }
    eprintln!("committer: {line}");
    e.exit_code()
}

fn s_next<'a>(
    e: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    e.and_then(|e| e.source())
}
