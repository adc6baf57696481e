//! The `post-save` command: the library's command line, with mimalloc as the allocator.

use std::process::ExitCode;

// mimalloc instead of glibc's malloc: draining the ledger allocates and frees a few dozen small
// blocks per event (JSON values, strings, one task per row lane); bench/DECISIONS.md has the
// profiles before and after. Here and not in the library: an embedder picks its own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    post_save::command_line()
}
