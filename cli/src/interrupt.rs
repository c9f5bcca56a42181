//! Ctrl-C, SIGTERM (how CI systems cancel a job) and SIGHUP end a client
//! command cleanly: the partial output it was writing beside its target is
//! removed, then the process ends by that same signal, so that what ran it
//! sees a command a signal ended (a shell reports 128 + its number, and a
//! script's loop stops on Ctrl-C instead of going on to the next command).
//! Nothing else needs undoing: the store's own writes are atomic, and what
//! an interrupted stash had written is collected by `ferry gc`. (A SIGKILL
//! cannot be caught: the next restore into the same directory sweeps what
//! it left.)

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Handles the three signals on a thread of their own, for the rest of the
/// process's life. Without a handler (it could not be installed) the
/// signals keep their default action: the process ends, scratch stays.
pub fn install() {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let removed = store::scratch::remove_all();
                let what = match signal {
                    SIGINT => "SIGINT",
                    SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                let cleaned = if removed > 0 {
                    "; the partial output was removed"
                } else {
                    ""
                };
                eprintln!("ferry: interrupted by {what}{cleaned}");
                // Ends the process as the signal would have; should that
                // fail, an exit with the status a shell would report.
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            }
        });
}
