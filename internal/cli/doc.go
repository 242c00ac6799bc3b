// Package cli is the granary command line: every subcommand, the automatic
// start of the local node, and the demo. cmd/granary's main only calls Run
// with a signal-aware context and maps the error to an exit code with
// ExitCode; keeping the logic here makes it importable by tests.
//
// Each command opens its own etcdstore.Store (its own lease) for as long as
// it runs, so a command that crashes leaves no references behind after the
// lease TTL, and one that exits closes its store and drops them at once.
//
// Exit codes: 0 ok, 1 error, 2 usage or configuration, 3 package does not
// exist; `build` and `run` exit with their command's code (127 when it
// cannot start, 128+N when killed by signal N). Message renders errors as
// one plain line (no package prefixes, a panicking builder's stack left to
// the log).
package cli
