//! What Tessera's binaries share around `main`: argument parsing where help and version print
//! normally and any other argument error becomes one line on stderr and exit status 2, logging to
//! stderr (colours only on a terminal), and the exit status of `run`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::error::ErrorKind;

/// Parses the process arguments into `T`, or returns the exit code after reporting the error.
pub fn parse_args<T: clap::Parser>(prog: &str) -> Result<T, ExitCode> {
    match T::try_parse() {
        Ok(t) => Ok(t),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            Err(if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("{prog}: {first} (see {prog} --help)");
            Err(ExitCode::from(2))
        }
    }
}

/// Logs to stderr at `RUST_LOG` (default `info`), with ANSI colours only on a terminal (tests and
/// `tessera up` parse the lines).
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The exit status of a daemon's `run`: success, or the error on one line after `prog:` and
/// status 1.
pub fn exit_status<E: std::fmt::Display>(prog: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: {e}");
            ExitCode::FAILURE
        }
    }
}
