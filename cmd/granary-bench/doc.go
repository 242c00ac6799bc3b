// Command granary-bench is Granary's lab: the benchmarks and the farm
// simulation, kept out of the granary binary so that the product links no
// test harness, no chart library and none of their initialisers.
//
// Usage:
//
//	granary-bench [flags]         the scenarios against raw etcd (--quick, --only, --json FILE, --chart FILE)
//	granary-bench farm [flags]    H hosts × a job rate per host on a private 3-member embedded etcd
//
// From a source checkout, `go run ./cmd/granary-bench --quick`. The
// scenario engine is internal/bench; this command only parses flags, wires
// the etcd connection and prints the results. The host agent scenario times
// warm `granary run` and `granary-run` jobs with the binaries of those
// names next to this program, else in $PATH (--granary, --granary-run name
// them), and skips those jobs when there are none. The memory scenarios run
// in a child process: this program re-executed as `granary-bench child`.
package main
