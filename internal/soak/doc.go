// Package soak holds the farm soak test, TestFarmSoak: a bounded version of
// the farm run of issue 18 with real processes only. A 3-member etcd
// cluster on loopback, one `granary serve` node per simulated host with its
// own state directory on one shared root, job launchers running
// `granary-run ID -- soakjob check ID` over Zipf-popular packages (building
// them with `granary build` when they are missing, as a farm's job script
// would, some failing on purpose, every third one needing the one before
// it), `granary rm`, `granary gc` and `granary invalidate` churn from
// random hosts, and faults: SIGSTOP of the etcd leader and of a follower,
// a restart of the etcd leader, kill -9 and restart of a node.
//
// It checks what must hold whatever the faults: no job sees its package,
// or a need of it, change or vanish while it holds a reference (a need
// must be the very tree its dependent was built on), unless it was told that
// the reference was lost (then granary-run stops it); no reference is left
// in etcd once the jobs ended and the linger and the TTL passed; no build
// fails other than the ones meant to, or stays "building" at the end; no
// job or build hangs.
//
// The package has no code of its own besides the test: the binaries it
// runs are built by the test from ./cmd/granary, ./cmd/granary-run, etcd's
// server module and testdata/soakjob (the builder and the job, which
// TestJobChecks holds to catching what it must).
// `go test -short` skips it; GRANARY_SOAK_* variables make longer and
// harsher local runs (see soakConfigFromEnv).
package soak
