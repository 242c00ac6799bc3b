// Command granary is the command line of Granary, a package store shared by
// the hosts of a build farm. All of its logic is in internal/cli; main only
// wires signals and maps errors to exit codes: 0 ok, 1 error, 2 usage, 3
// package does not exist; `granary build` and `granary run` exit with their
// command's code (127 when it cannot start, 128+N when signal N killed it).
//
// Usage:
//
//	granary build ID -- CMD [ARGS...]   build once, cluster-wide
//	granary run ID -- CMD [ARGS...]     run CMD holding a reference
//	granary ls | inspect ID | rm ID | gc | status | verify ID
//	granary logs [--follow] [--attempt N] ID   a build's log, from any host
//	granary events [--json] [--since REV]      live stream of what the cluster does
//	granary version                      module version and VCS revision
//	granary node status | node stop     the auto-started local node
//	granary serve                        run a node in the foreground
//	granary demo                         3 simulated hosts, self-checking
//
// With no --endpoints (or $GRANARY_ENDPOINTS) the commands start and use a
// local node with an embedded etcd in $XDG_STATE_HOME/granary (else
// ~/.local/state/granary), and keep packages under $XDG_DATA_HOME/granary
// (else ~/.local/share/granary); --state-dir and --root change them.
package main
