//! Thin entry point: parse → validate → check local outputs → run → print the result or one
//! error line → exit code. The sandbox is resumed on every way out: success, error, panic,
//! SIGTERM and SIGINT. Every failure, argument errors and panics included, ends in exactly one
//! line on stderr (`committer: …`, or one JSON object with JSON logs).

use clap::Parser;
use committer::cli::{Cli, Command, LogFormat, LogLevel, UsageError};
use committer::error::{exit, CommitError};
use committer::outputs::{self, DiffOutput};
use committer::{freeze, log, progress, report};
use std::sync::Mutex;

fn main() {
    // The supervisor (outliving the commit) or, in the worker it started, a return to here.
    committer::supervise::enter();
    let args = log::args_lossy();
    forget_empty_env();
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(argument_error(e, &args)),
    };
    init_log(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log::failure(
                &format!("cannot start the async runtime: {e}"),
                exit::INTERNAL,
            );
            std::process::exit(exit::INTERNAL);
        }
    };
    let code = runtime.block_on(run(cli));
    // Don't wait for blocking readers that an interrupt left behind.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}

/// Variables set but empty (`SOURCE_DATE_EPOCH=` in a CI environment) mean unset, as the
/// reproducible-builds spec and shells treat them, rather than an error about a flag never given.
fn forget_empty_env() {
    for name in [
        "SOURCE_DATE_EPOCH",
        "CONTAINERD_ADDRESS",
        "CONTAINERD_NAMESPACE",
        "COMMITTER_LOG",
    ] {
        if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
            // Single-threaded here: nothing else reads the environment yet.
            std::env::remove_var(name);
        }
    }
}

fn init_log(cli: &Cli) {
    let level = match cli.log_level {
        LogLevel::Error => 0,
        LogLevel::Warn => 1,
        LogLevel::Info => 2,
        LogLevel::Debug => 3,
    };
    let level = if cli.quiet { level.min(1) } else { level };
    log::init(level, json_format(cli.log_format));
}

fn json_format(f: LogFormat) -> Option<bool> {
    match f {
        LogFormat::Auto => None,
        LogFormat::Text => Some(false),
        LogFormat::Json => Some(true),
    }
}

/// A clap error as one line in the format the arguments asked for (help and version print as
/// clap renders them).
fn argument_error(e: clap::Error, args: &[String]) -> i32 {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return 0;
    }
    log::init_from_args(args);
    let line = match e.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            "give a command: commit or diff (see committer --help)".to_string()
        }
        _ => one_line(&e.render().to_string()),
    };
    log::failure(&line, exit::USAGE);
    exit::USAGE
}

/// clap's message without its `error: ` prefix, usage block and blank lines; its tip kept.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"));
    let first = lines.next().unwrap_or("invalid arguments");
    let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
    if let Some(tip) = lines.find_map(|l| l.strip_prefix("tip: ")) {
        line = format!("{line} ({tip})");
    }
    format!("{line}; see committer --help")
}

/// The message of the first panic, shown as the run's one error line.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// A panic becomes one line and exit 1 (through the normal error path, which resumes the
/// sandbox), never a backtrace and exit 101.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let mut first = PANIC.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(format!(
            "internal error: {what}{at}; this is a bug, please report it with the command you ran"
        ));
    }));
}

fn panic_line() -> Option<String> {
    PANIC.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn progress_mode(quiet: bool) -> progress::Mode {
    use std::io::IsTerminal;
    if quiet {
        progress::Mode::Off
    } else if log::is_json() {
        progress::Mode::Json
    } else if std::io::stderr().is_terminal() {
        progress::Mode::Bar
    } else {
        progress::Mode::Text
    }
}

async fn run(cli: Cli) -> i32 {
    let mode = progress_mode(cli.quiet);
    let mut work = tokio::spawn(async move {
        let out = match cli.command {
            Command::Commit(args) => commit(&args, mode).await,
            Command::Diff(args) => diff(&args, mode).await,
        };
        progress::stop();
        out
    });
    let code = tokio::select! {
        joined = &mut work => match joined {
            Ok(Ok(())) => 0,
            Ok(Err(code)) => code,
            Err(e) => fail_line(&format!("internal error: {e}"), exit::INTERNAL),
        },
        sig = interrupted() => {
            // Stop the commit at its next await: no blob, manifest or tag goes out after this.
            // Its lease is left to the supervisor, which deletes it as soon as this process is gone.
            work.abort();
            let _ = work.await;
            progress::stop();
            return match freeze::resume_if_paused().await {
                Ok(()) => failure(CommitError::Interrupted(sig)),
                Err(e) => fail_line(
                    &format!("interrupted by {sig}, and resuming the container failed: {e}; resume it with `ctr tasks resume`"),
                    exit::INTERRUPTED,
                ),
            };
        }
    };
    if let Err(e) = freeze::resume_if_paused().await {
        log::error(&format!("could not resume the container: {e}"));
    }
    code
}

async fn commit(args: &committer::cli::CommitArgs, mode: progress::Mode) -> Result<(), i32> {
    let plan = args.plan().map_err(usage)?;
    if let Some(path) = &plan.result_file {
        outputs::check_result_file(path).map_err(usage)?;
    }
    outputs::check_spool_dir(plan.spool_dir.as_deref()).map_err(usage)?;
    committer::source::spool::check_reserve_setting().map_err(|e| usage(UsageError(e)))?;
    progress::start(mode);
    let result = committer::commit::commit(&plan).await.map_err(failure)?;
    progress::stop();
    summary(&result);
    println!("{}", report::to_json(&result));
    if let Some(path) = &plan.result_file {
        if let Err(e) = report::write_result_file(path, &result) {
            log::warn(&format!("writing the result to {}: {e}", path.display()));
        }
    }
    Ok(())
}

/// One human line after the bar (an info event in JSON logs): what was pushed and what it cost.
fn summary(r: &report::CommitResult) {
    let t = progress::totals();
    let size = |n: u64| progress::human_bytes(n);
    let layer = match &r.layer {
        Some(l) => format!(
            "a {} layer ({} entries, {} read from the sandbox)",
            size(l.size),
            r.entries,
            size(t.read)
        ),
        None => "no new layer (nothing changed)".into(),
    };
    let msg = format!(
        "pushed {} — {layer}; paused {} ms; {:.1} s",
        r.image,
        r.paused.ms,
        r.duration_ms as f64 / 1000.0
    );
    log::event(
        2,
        &msg,
        serde_json::json!({"event": "summary", "readBytes": t.read, "uploadedBytes": t.uploaded}),
    );
}

async fn diff(args: &committer::cli::DiffArgs, mode: progress::Mode) -> Result<(), i32> {
    let plan = args.plan().map_err(usage)?;
    let output = DiffOutput::prepare(&args.output).map_err(usage)?;
    committer::source::spool::check_reserve_setting().map_err(|e| usage(UsageError(e)))?;
    progress::start(mode);
    let desc = committer::commit::diff_to_file(&plan, output.path())
        .await
        .map_err(failure)?;
    progress::stop();
    let to_stdout = output.is_stdout();
    output.finish().map_err(|e| {
        fail_line(
            &format!("writing the layer to {}: {e}", args.output.display()),
            exit::INTERNAL,
        )
    })?;
    let json = serde_json::to_string(&desc).expect("descriptor serialises");
    if to_stdout {
        // stdout holds the blob: the descriptor goes to stderr.
        eprintln!("{json}");
    } else {
        println!("{json}");
    }
    Ok(())
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

fn usage(e: UsageError) -> i32 {
    fail_line(&e.to_string(), exit::USAGE)
}

/// Prints the run's one error line — the first panic's, when there was one — and returns `code`
/// (1 after a panic).
fn fail_line(line: &str, code: i32) -> i32 {
    progress::stop();
    match panic_line() {
        Some(p) => {
            log::failure(&p, exit::INTERNAL);
            exit::INTERNAL
        }
        None => {
            log::failure(line, code);
            code
        }
    }
}

fn failure(e: CommitError) -> i32 {
    fail_line(&committer::error::chain_line(&e), e.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clap_error_becomes_one_line_with_its_tip() {
        let e = Cli::try_parse_from(["committer", "commit", "--bogus"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("unexpected argument '--bogus' found"),
            "{line}"
        );
        assert!(line.ends_with("see committer --help"), "{line}");
    }

    #[test]
    fn a_panic_is_recorded_as_one_line_asking_for_a_report() {
        install_panic_hook();
        let _ = std::panic::catch_unwind(|| panic!("boom\nsecond line"));
        let _ = std::panic::take_hook();
        let line = panic_line().expect("the hook recorded the panic");
        assert!(line.starts_with("internal error: boom"), "{line}");
        assert!(line.contains("please report"), "{line}");
    }
}
