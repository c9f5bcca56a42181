//! Ctrl-C, SIGTERM (how CI systems cancel a job) and SIGHUP end a client
//! command cleanly: the partial output it was writing beside its target is
//! removed, then the process ends by that same signal, so that what ran it
//! sees a command a signal ended (a shell reports 128 + its number, and a
//! script's loop stops on Ctrl-C instead of going on to the next command).
//!
//! A remote unstash first winds down (at most [`GRACE`]): its downloads
//! stop and the chunks that arrived are made durable in the node's store,
//! so that running the command again fetches none of them. A second signal
//! ends it at once. Nothing else needs undoing: the store's own writes are
//! atomic, and what an interrupted stash had written is collected by
//! `ferry gc`. (A SIGKILL cannot be caught: the next restore into the same
//! directory sweeps what it left.)

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::Duration;

/// How long a remote unstash may take to wind down before the process ends
/// regardless (CI systems send SIGKILL some seconds after SIGTERM).
const GRACE: Duration = Duration::from_secs(5);

/// The first signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Whether a running transfer winds down on [`STOP`] (else the first
/// signal ends the process at once).
static WINDS_DOWN: AtomicBool = AtomicBool::new(false);
static STOP: OnceLock<transfer::client::Stop> = OnceLock::new();

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
            for signal in signals.forever() {
                let first = RECEIVED.compare_exchange(0, signal, SeqCst, SeqCst).is_ok();
                if first && WINDS_DOWN.load(SeqCst) {
                    stop().request();
                    let _ = std::thread::Builder::new()
                        .name("ferry-grace".into())
                        .spawn(move || {
                            std::thread::sleep(GRACE);
                            end(signal, false)
                        });
                    continue;
                }
                end(signal, false)
            }
        });
}

/// The stop request a remote unstash is to watch; from now on the first
/// signal asks it to wind down instead of ending the process.
pub fn winding_down() -> transfer::client::Stop {
    WINDS_DOWN.store(true, SeqCst);
    stop().clone()
}

fn stop() -> &'static transfer::client::Stop {
    STOP.get_or_init(transfer::client::Stop::default)
}

/// Ends the process as the signal received would have, if one was: for
/// the main thread once a command has wound down.
pub fn end_if_received() {
    match RECEIVED.load(SeqCst) {
        0 => {}
        signal => end(signal, stop().requested()),
    }
}

/// Removes the partial output, says why the command ends, and ends the
/// process by `signal`; `wound_down`: a remote unstash kept its chunks.
fn end(signal: i32, wound_down: bool) -> ! {
    let removed = store::scratch::remove_all();
    let what = match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    };
    let mut done = Vec::new();
    if removed > 0 {
        done.push("the partial output was removed");
    }
    if wound_down {
        done.push("the chunks fetched were kept for the next run");
    }
    let done = if done.is_empty() {
        String::new()
    } else {
        format!("; {}", done.join(", "))
    };
    eprintln!("ferry: interrupted by {what}{done}");
    // Ends the process as the signal would have; should that fail, an
    // exit with the status a shell would report.
    let _ = signal_hook::low_level::emulate_default_handler(signal);
    std::process::exit(128 + signal)
}
