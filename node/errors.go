package node

import (
	"errors"

	"github.com/granary-build/granary/agent"
)

// The node's sentinels. Messages read as core/errors.go says: no package
// prefix, and a store error the node passes on is not named again (it
// names its operation and package).

var (
	// ErrNoLocalNode is returned by ReadLocal, and wrapped by the error of
	// agent.Connect, when no local node serves the state directory. It is
	// agent.ErrNoLocalNode.
	ErrNoLocalNode = agent.ErrNoLocalNode

	// ErrNodeGone is agent.ErrNodeGone: wrapped by the errors of a
	// connection whose node went away, and by LocalRefs' after Close.
	ErrNodeGone = agent.ErrNodeGone

	// ErrNoQuorum means the etcd members that answered have no leader: too
	// few members are up for a quorum (for example 2 of 3 down), so nothing
	// can be read or written until enough come back.
	ErrNoQuorum = errors.New("etcd has no leader: quorum lost")

	// ErrUnreachable wraps a failure to reach etcd.
	ErrUnreachable = errors.New("cannot reach etcd")

	// ErrPermission means etcd answered but refused the credentials.
	ErrPermission = errors.New("etcd refused access")

	// ErrNegative is wrapped by the error for a negative duration where only
	// zero or more makes sense.
	ErrNegative = errors.New("negative duration")

	// ErrNodeRunning is returned by New when another local node holds the state
	// directory.
	ErrNodeRunning = errors.New("a local node already runs for this state directory")
)
