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
            eprintln!("{prog}: {} (see {prog} --help)", first_message(&text));
            Err(ExitCode::from(2))
        }
    }
}

/// The first line of a clap error, with the indented lines that complete it when it ends with
/// a colon (the arguments that were not provided).
fn first_message(text: &str) -> String {
    let mut lines = text.lines();
    let mut msg = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string();
    if msg.ends_with(':') {
        let rest: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
        msg.push(' ');
        msg.push_str(&rest.join(", "));
    }
    msg
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

#[cfg(test)]
mod tests {
    use super::first_message;

    #[test]
    fn clap_errors_become_one_line_with_what_was_missing() {
        assert_eq!(first_message("error: unexpected argument 'x' found\n\nUsage: t\n"), "unexpected argument 'x' found");
        assert_eq!(
            first_message("error: the following required arguments were not provided:\n  --a <A>\n  --b <B>\n\nUsage: t\n"),
            "the following required arguments were not provided: --a <A>, --b <B>"
        );
        assert_eq!(first_message(""), "invalid arguments");
    }
}
