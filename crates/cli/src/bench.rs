//! `switchboard bench ARGS…` runs `switchboard-bench ARGS…`: the benchmark tool is a
//! crate of its own, so this binary links nothing only the benchmarks need. It is looked
//! for beside this binary (where `cargo build` puts both), then on the `PATH`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Default, Args)]
#[command(disable_help_flag = true)]
pub(crate) struct BenchArgs {
    /// What `switchboard-bench` takes (`switchboard bench --help` lists it).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

/// Replaces this process with `switchboard-bench` (on Unix), or runs it and passes its
/// exit status on.
pub(crate) fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let name = format!("switchboard-bench{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .map(|me| me.with_file_name(&name))
        .filter(|path| path.exists());
    let program = beside.unwrap_or_else(|| PathBuf::from(&name));
    let mut command = Command::new(&program);
    command.args(&args.args);
    let missing = || {
        format!(
            "running {}: build it with `cargo build --release -p switchboard-bench` \
             (it is put beside `switchboard`) or put it on the PATH",
            program.display()
        )
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Only returns on failure.
        let error = command.exec();
        Err(error).with_context(missing)
    }
    #[cfg(not(unix))]
    {
        let status = command.status().with_context(missing)?;
        Ok(std::process::ExitCode::from(
            u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
        ))
    }
}
