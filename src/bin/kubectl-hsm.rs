//! `kubectl hsm`: the kubectl plugin (kubectl finds `kubectl-hsm` on PATH). All logic is in
//! `hsm_secrets::kubectl`.

fn main() {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(hsm_secrets::kubectl::main_with_args(std::env::args_os()));
    std::process::exit(code);
}
