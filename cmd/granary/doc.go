// Command granary is the command line of Granary, a package store shared by
// the hosts of a build farm. All of its logic is in internal/cli; main only
// wires signals and maps errors to exit codes: 0 ok, 1 error, 2 usage, 3
// package does not exist; `granary run` exits with its command's code.
//
// Usage:
//
//	granary build ID -- CMD [ARGS...]   build once, cluster-wide
//	granary run ID -- CMD [ARGS...]     run CMD holding a reference
//	granary ls | inspect ID | rm ID | gc | status | verify ID
//	granary node status | node stop     the auto-started local node
//	granary serve                        run a node in the foreground
//	granary demo                         3 simulated hosts, self-checking
//
// With no --endpoints (or $GRANARY_ENDPOINTS) the commands start and use a
// local node with an embedded etcd in $XDG_STATE_HOME/granary.
package main
