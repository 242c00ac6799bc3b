package node

import (
	"context"

	"github.com/granary-build/granary/agent"
)

// The client of the node's local API is package agent. These forwarders
// keep programs written against node's client compiling; new code uses
// agent, which does not link etcd.

// Conn is agent.Conn.
//
// Deprecated: use agent.Conn.
type Conn = agent.Conn

// ConnHandle is agent.Handle.
//
// Deprecated: use agent.Handle.
type ConnHandle = agent.Handle

// ConnectOptions is agent.Options.
//
// Deprecated: use agent.Options.
type ConnectOptions = agent.Options

// RemoteError is agent.Error.
//
// Deprecated: use agent.Error.
type RemoteError = agent.Error

// NoticeKind is agent.NoticeKind.
//
// Deprecated: use agent.NoticeKind.
type NoticeKind = agent.NoticeKind

// Notice is agent.Notice.
//
// Deprecated: use agent.Notice.
type Notice = agent.Notice

// Notice kinds: agent's.
//
// Deprecated: use agent's.
const (
	NoticeRefLost       = agent.NoticeRefLost
	NoticeLeaseLost     = agent.NoticeLeaseLost
	NoticeLeaseRestored = agent.NoticeLeaseRestored
	NoticeNodeGone      = agent.NoticeNodeGone
)

// Connect is agent.Connect.
//
// Deprecated: use agent.Connect.
func Connect(ctx context.Context, stateDir string) (*Conn, error) {
	return agent.Connect(ctx, stateDir)
}

// ConnectWith is agent.ConnectWith.
//
// Deprecated: use agent.ConnectWith.
func ConnectWith(ctx context.Context, stateDir string, o ConnectOptions) (*Conn, error) {
	return agent.ConnectWith(ctx, stateDir, o)
}

// BuilderProcessGroup is agent.BuilderProcessGroup.
//
// Deprecated: use agent.BuilderProcessGroup.
func BuilderProcessGroup(ctx context.Context, pgid int) bool {
	return agent.BuilderProcessGroup(ctx, pgid)
}
