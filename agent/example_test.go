package agent_test

import (
	"context"
	"log"
	"os"
	"path/filepath"

	"github.com/granary-build/granary/agent"
)

// A job on a host takes its package through the host's node: the node
// holds the host's one etcd reference, and the job's reference ends with
// its connection (Close, exit, or a crash).
func ExampleConnect() {
	ctx := context.Background()
	conn, err := agent.Connect(ctx, "/var/lib/granary") // the node's state directory
	if err != nil {
		log.Fatal(err) // errors.Is(err, agent.ErrNoLocalNode): no node serves it
	}
	defer conn.Close()
	pkg := conn.Handle("cpython-3.12.7-4f1c2a")
	err = pkg.BuildContext(ctx, func(ctx context.Context) error { // runs here, once per host
		return os.WriteFile(filepath.Join(pkg.OutputDirectory(), "python"), []byte("…"), 0o755)
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := pkg.IncRefContext(ctx); err != nil {
		log.Fatal(err)
	}
	defer pkg.DecRefContext(ctx)
	select {
	case <-conn.Done(): // the node went away: the reference is gone
		log.Print(conn.Err())
	default:
		// use pkg.OutputDirectory()
	}
}
