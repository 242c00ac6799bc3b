package agent_test

import (
	"context"
	"errors"
	"testing"

	"github.com/granary-build/granary/agent"
)

// A failed dial wraps ErrNoLocalNode, and only that, whichever way the
// connection is made (agentwire's DialHold wrapped ErrNodeGone instead).
func TestDialFailureWrapsNoLocalNode(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	_, err := agent.Connect(ctx, dir)
	_, _, herr := agent.ConnectHold(ctx, dir, agent.Options{}, "p", true)
	for _, tc := range []struct {
		name string
		err  error
	}{{"Connect", err}, {"ConnectHold", herr}} {
		if !errors.Is(tc.err, agent.ErrNoLocalNode) || errors.Is(tc.err, agent.ErrNodeGone) {
			t.Errorf("%s with no node = %v; want ErrNoLocalNode and not ErrNodeGone", tc.name, tc.err)
		}
	}
}
