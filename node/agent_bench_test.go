package node_test

import (
	"context"
	"testing"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// BenchmarkConnPair is a warm IncRef+DecRef pair through a Conn (the host
// holds the package; no etcd request), from b.RunParallel's goroutines,
// each with a Conn of its own.
func BenchmarkConnPair(b *testing.B) {
	srv := etcdtest.Start(b)
	root := b.TempDir()
	cfg := node.DefaultConfig()
	cfg.Endpoints = []string{srv.Endpoint}
	cfg.Root = root
	cfg.StateDir = shortDirB(b)
	cfg.GCInterval = 0
	n, err := node.New(context.Background(), cfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	defer func() { cancel(); <-done }()
	h := n.Store().Handle("bench")
	if err := h.BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
		b.Fatal(err)
	}
	warm, err := agent.Connect(ctx, cfg.StateDir)
	if err != nil {
		b.Fatal(err)
	}
	defer warm.Close()
	if err := warm.Handle("bench").IncRefContext(ctx); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c, err := agent.Connect(ctx, cfg.StateDir)
		if err != nil {
			b.Error(err)
			return
		}
		defer c.Close()
		h := c.Handle("bench")
		for pb.Next() {
			if err := h.IncRefContext(ctx); err != nil {
				b.Error(err)
				return
			}
			if err := h.DecRefContext(ctx); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func shortDirB(b *testing.B) string {
	b.Helper()
	return shortDirTB(b)
}
