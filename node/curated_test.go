package node_test

import (
	"context"

	"github.com/granary-build/granary/agent"
)

// curatedConn adapts a Conn's pins and invalidation (through the node) to
// coretest.Curator.
type curatedConn struct{ *agent.Conn }

func (c curatedConn) Pin(ctx context.Context, id string) error {
	_, err := c.Conn.Pin(ctx, id, agent.PinOptions{Note: "conformance"})
	return err
}

func (c curatedConn) Unpin(ctx context.Context, id string) error {
	_, err := c.Conn.Unpin(ctx, id)
	return err
}

func (c curatedConn) Invalidate(ctx context.Context, id, reason string) error {
	_, err := c.Conn.Invalidate(ctx, id, reason)
	return err
}
