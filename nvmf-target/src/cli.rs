//! Command-line parsing shared by Tessera's binaries: help and version print normally, and any
//! other argument error becomes one line on stderr and exit status 2.

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
