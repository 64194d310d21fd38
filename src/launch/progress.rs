//! The launcher's progress bar for a training job: step, loss, tokens/s
//! and ETA at the bottom of the terminal, fed by the window lines rank 0
//! prints. Only on a terminal: in a log file (CI, Slurm) every line is
//! kept as printed.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::roles::WindowLine;

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `windows` windows, or `None` when stderr is no terminal.
    pub fn on_terminal(windows: u64) -> Option<Progress> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::new(windows);
        let style = ProgressStyle::with_template(
            "{bar:30.cyan/blue} step {pos}/{len}  {msg}  elapsed {elapsed}  ETA {eta}",
        )
        .ok()?;
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Some(Progress { bar })
    }

    /// Takes one line of rank 0's output: a window line moves the bar
    /// (and is printed above it only when it carries a validation loss);
    /// returns whether the line was taken.
    pub fn take(&self, line: &str) -> bool {
        let Some(w) = WindowLine::parse(line) else {
            return false;
        };
        if self.bar.position() == 0 {
            // A resumed run starts part-way: measure speed from here.
            self.bar.set_position(w.window + 1);
            self.bar.reset_eta();
        }
        self.bar.set_position(w.window + 1);
        self.bar.set_message(format!(
            "loss {:.4}  {:.0} tokens/s",
            w.loss, w.tokens_per_s
        ));
        w.val_loss.is_none()
    }

    /// Runs `print` with the bar cleared, so output never tears it.
    pub fn above<R>(&self, print: impl FnOnce() -> R) -> R {
        self.bar.suspend(print)
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}
