//! `loadtest`: synthetic publishers and subscribers against a gateway. See `loadtest --help`
//! and loadtest/README.md.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = loadtest::cli::Args::parse();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let (cfg, outputs) = match args.into_config() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("loadtest: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
        let report = match loadtest::run(cfg).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("loadtest: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!("{}", report.table());
        if let Some(path) = &outputs.json {
            if let Err(e) = report.write_json(path) {
                eprintln!("loadtest: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
            println!("figures written to {}", path.display());
        }
        if let Some(path) = &outputs.plot {
            if let Err(e) = report.plot(path) {
                eprintln!("loadtest: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
            println!("plot written to {}", path.display());
        }
        std::process::ExitCode::SUCCESS
    })
}
