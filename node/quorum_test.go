package node_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// TestDialNamesQuorumLoss: with 2 of 3 etcd members down, Dial says that
// quorum is lost and which member answered, not "cannot reach etcd".
func TestDialNamesQuorumLoss(t *testing.T) {
	cl := etcdtest.StartCluster(t, 3)
	cfg := node.DefaultConfig()
	cfg.Endpoints = cl.Endpoints
	cfg.OpTimeout = 2 * time.Second
	cli, err := node.Dial(context.Background(), &cfg)
	if err != nil {
		t.Fatalf("Dial with all members up: %v", err)
	}
	cli.Close()

	cl.Stop(1)
	cl.Stop(2)
	_, err = node.Dial(context.Background(), &cfg)
	if !errors.Is(err, node.ErrNoQuorum) {
		t.Fatalf("Dial with 2 of 3 down = %v, want ErrNoQuorum", err)
	}
	for _, want := range []string{"quorum lost", "answered without a leader: " + cfg.Endpoints[0], "no answer from " + cfg.Endpoints[1]} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Dial error %q does not say %q", err, want)
		}
	}
}
