// Package bench is the scenario engine of `granary-bench` (cmd/granary-bench,
// the lab, which the granary binary does not link): it measures the
// store's hot path, waiter release, build stampedes, distinct builds, crash
// takeover, pruning and memory against a raw-etcd baseline taken in the same
// run, on whatever etcd its client factory reaches, and checks the results
// against the targets of the benchmark issue.
//
// Each run works under a key prefix and a temporary shared root of its own
// and removes both at the end. Simulated hosts are stores on separate etcd
// clients; every client counts its unary requests (see Counter), so that
// "the same number of etcd operations" is checked, not assumed. The memory
// scenarios run in a child process (Config.Child, running ChildMain) so that
// their RSS is theirs alone.
//
// Run owns every store, client and goroutine it starts and closes them
// before it returns.
package bench
