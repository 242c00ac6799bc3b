// Command granary-run is the light job launcher of Granary:
//
//	granary-run [flags] ID -- CMD [ARGS...]
//
// does what `granary run ID -- CMD [ARGS...]` does (same flags,
// environment, defaults, messages and exit codes) through the host's
// local node, in a binary that links no etcd, gRPC or protobuf, so that a
// job on a package the host already holds starts in a few milliseconds.
// When it cannot do the job itself (no local node, another root or
// prefix, $GRANARY_AGENT=off, an unknown flag, a build to wait for) it
// execs the full `granary run` with the same arguments. Its logic is in
// internal/thinrun.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/granary-build/granary/internal/thinrun"
)

func main() {
	// stop is not called: the process ends with os.Exit, and restoring
	// the two signals' default handling first would cost a round trip with
	// the runtime's signal thread for each, in every job.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	_ = stop
	err := thinrun.Main(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	os.Exit(thinrun.Exit(err, os.Stderr))
}
