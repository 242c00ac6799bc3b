package node_test

import (
	"context"
	"log"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/granary-build/granary/node"
)

// A host process joins a cluster, builds through the node's store, and
// serves until interrupted; cancelling the context shuts it down in order
// (GC stopped, builds cancelled, lease revoked so its references drop).
func Example() {
	cfg := node.DefaultConfig()
	if err := cfg.FromEnv(os.Getenv); err != nil { // GRANARY_ENDPOINTS, GRANARY_ROOT, …
		log.Fatal(err)
	}
	cfg.ListenMetrics = "127.0.0.1:9464"

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	n, err := node.New(ctx, cfg, nil)
	if err != nil {
		log.Fatal(err)
	}
	h := n.Store().Handle("cpython-3.12.7-4f1c2a")
	_, err = n.Build(ctx, "cpython-3.12.7-4f1c2a", func(ctx context.Context) error {
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "python"), []byte("…"), 0o755)
	})
	if err != nil {
		log.Print(err)
	}
	if err := n.Run(ctx); err != nil {
		log.Fatal(err)
	}
}
