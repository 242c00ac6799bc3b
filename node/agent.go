package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"sort"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
)

// AgentSocket is the file name of the node's local API socket in the state
// directory.
const AgentSocket = agent.SocketName

// buildFunc is the store's BuildNeedsOutcome for an ID.
type buildFunc func(ctx context.Context, id string, needs []string, builder func(context.Context) error) (etcdstore.Outcome, error)

// server is the node's local API: it serves Conns on <state>/agent.sock and
// aggregates their references, so the host holds at most one etcd reference
// per package however many local processes hold it.
//
// Ownership: Node.New makes the agent and its listener; Node.Run runs
// serve, which owns one goroutine per connection and every request
// goroutine (through wg) and, on return, has closed every connection and
// waited for all of them. Linger timers take part in wg while they release.
type server struct {
	store     *etcdstore.Store
	log       *slog.Logger
	host      string
	opTimeout time.Duration
	linger    time.Duration
	build1    buildFunc
	priv      *privilege // who may remove, pin, unpin, invalidate
	ln        *net.UnixListener
	path      string

	refs *hostRefs // the host references (hostrefs.go)
	held heldSet   // references held for others than connections (holds.go)

	mu     sync.Mutex
	closed bool
	conns  map[*agentConn]struct{}
	wg     sync.WaitGroup
}

// newAgent listens on cfg's agent socket with cfg's mode and group, for
// store. The caller holds the state directory's lock, so a leftover socket
// file is stale and removed. build, if not nil, replaces the store's
// BuildContext (the node times builds in its metrics).
func newAgent(store *etcdstore.Store, cfg Config, log *slog.Logger, build buildFunc) (*server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if build == nil {
		build = func(ctx context.Context, id string, needs []string, builder func(context.Context) error) (etcdstore.Outcome, error) {
			return store.Handle(id).BuildNeedsOutcome(ctx, needs, builder)
		}
	}
	priv, err := newPrivilege(cfg.AdminGroup)
	if err != nil {
		return nil, err
	}
	path := cfg.AgentSocketPath()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("agent socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, cfg.SocketMode.Perm()); err != nil {
		ln.Close()
		return nil, fmt.Errorf("agent socket mode: %w", err)
	}
	if cfg.SocketGroup != "" {
		gid, err := lookupGroup(cfg.SocketGroup)
		if err == nil {
			err = os.Chown(path, -1, gid)
		}
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("agent socket group %q: %w", cfg.SocketGroup, err)
		}
	}
	if cfg.SocketMode.Perm()&0o077 != 0 {
		// Others than the node's user may connect: they must be able to
		// reach the socket, not list or read the state directory.
		if st, err := os.Stat(cfg.StateDir); err == nil && st.Mode().Perm()&0o011 != 0o011 {
			if err := os.Chmod(cfg.StateDir, st.Mode().Perm()|0o011); err != nil {
				ln.Close()
				return nil, fmt.Errorf("state directory mode: %w", err)
			}
		}
	}
	a := &server{
		store: store, log: log, host: cfg.Name, opTimeout: cfg.OpTimeout, linger: cfg.Linger, build1: build, priv: priv, ln: ln, path: path,
		conns: make(map[*agentConn]struct{}),
	}
	a.refs = newHostRefs(storeRefs{store}, cfg.Linger, cfg.OpTimeout, log, a.tellLost)
	return a, nil
}

func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}

// active reports how many connections are open.
func (a *server) active() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.conns)
}

// serve accepts connections until ctx ends, then, in this order: stops
// accepting (the socket file goes), closes every connection (clients
// learn at once that the node is gone), stops the linger timers and waits
// for the host references' background work, and waits for every request
// and connection goroutine (the store's Close, which follows, revokes the
// lease with the references on it).
func (a *server) serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { a.ln.Close() })
	defer stop()
	var err error
	for {
		c, aerr := a.ln.AcceptUnix()
		if aerr != nil {
			if ctx.Err() == nil {
				err = fmt.Errorf("agent socket: %w", aerr)
			}
			break
		}
		ac := a.newConn(ctx, c)
		if ac == nil {
			c.Close()
			continue
		}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			ac.run()
		}()
	}
	a.ln.Close()
	a.mu.Lock()
	a.closed = true
	for c := range a.conns {
		c.c.Close()
		c.cancel()
	}
	a.mu.Unlock()
	a.refs.close()
	a.wg.Wait()
	return err
}

// holders lists the local references to id, oldest first.
func (a *server) holders(id string) []Holder {
	a.mu.Lock()
	conns := make([]*agentConn, 0, len(a.conns))
	for c := range a.conns {
		conns = append(conns, c)
	}
	a.mu.Unlock()
	out := []Holder{}
	for _, c := range conns {
		c.mu.Lock()
		for _, since := range c.refs[id] {
			out = append(out, Holder{UID: c.uid, PID: c.pid, Since: since, Purpose: c.purpose})
		}
		c.mu.Unlock()
	}
	out = append(out, a.held.list(id)...)
	sort.Slice(out, func(i, j int) bool { return out[i].Since.Before(out[j].Since) })
	return out
}

// Holders lists the references to id held through this node's local API,
// oldest first.
func (n *Node) Holders(id string) []Holder {
	a := n.agent.Load()
	if a == nil {
		return nil
	}
	return a.holders(id)
}

// tellLost tells every connection holding id that its reference is lost
// with the package (the host references' lost hook).
func (a *server) tellLost(id string, cause error) {
	a.mu.Lock()
	conns := a.connsLocked()
	a.mu.Unlock()
	for _, c := range conns {
		c.mu.Lock()
		n := len(c.refs[id])
		c.mu.Unlock()
		if n > 0 {
			c.send(&agent.Msg{Op: agent.OpRefLost, ID: id, Err: fmt.Sprint(cause)})
		}
	}
}

func (a *server) connsLocked() []*agentConn {
	out := make([]*agentConn, 0, len(a.conns))
	for c := range a.conns {
		out = append(out, c)
	}
	return out
}

// broadcast sends m to every connection, from a goroutine of its own (it
// is called from the store's event hook, which must not block).
func (a *server) broadcast(m agent.Msg) {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return
	}
	conns := a.connsLocked()
	a.wg.Add(1)
	a.mu.Unlock()
	go func() {
		defer a.wg.Done()
		for _, c := range conns {
			c.send(&m)
		}
	}()
}

// event is the agent's share of the store's events.
func (a *server) event(e etcdstore.Event) {
	switch e.Kind {
	case etcdstore.EventRefLost:
		a.refs.refLost(e.ID, e.Err)
	case etcdstore.EventYieldRequested:
		a.refs.yield(e.ID, e.Host)
	case etcdstore.EventHoldersRequested:
		a.refs.census(e.ID)
	case etcdstore.EventLeaseLost:
		a.broadcast(agent.Msg{Op: agent.OpLeaseLost, Err: fmt.Sprint(e.Err)})
	case etcdstore.EventLeaseRestored:
		a.broadcast(agent.Msg{Op: agent.OpLeaseBack})
	case etcdstore.EventWaiting, etcdstore.EventLockDelay, etcdstore.EventFailed, etcdstore.EventCacheHit,
		etcdstore.EventCacheMiss, etcdstore.EventPublished, etcdstore.EventCacheStored, etcdstore.EventCacheUploadFailed,
		etcdstore.EventLastFailed, // the builder says "the last attempt failed", as without a node
		etcdstore.EventWaitInvalid:
		a.toBuilders(e)
	}
}

// toBuilders sends a build's event to the connections building its
// package or waiting for it in IncRef, from a goroutine of its own.
func (a *server) toBuilders(e etcdstore.Event) {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return
	}
	var to []*agentConn
	for c := range a.conns {
		c.mu.Lock()
		found := c.increfs[e.ID] > 0
		for _, b := range c.builds {
			found = found || b.id == e.ID
		}
		if found {
			to = append(to, c)
		}
		c.mu.Unlock()
	}
	if len(to) == 0 {
		a.mu.Unlock()
		return
	}
	a.wg.Add(1)
	a.mu.Unlock()
	go func() {
		defer a.wg.Done()
		m := agent.Msg{Op: agent.OpEvent, ID: e.ID, Event: wireEvent(e)}
		for _, c := range to {
			c.send(&m)
		}
	}()
}

// LocalAPI is the node's local API served for a store outside a Node: for
// programs that embed a store and want to serve their host's processes,
// and for benchmarks. Node.New makes one itself; do not serve two for one
// state directory.
type LocalAPI struct{ a *server }

// NewLocalAPI listens on <cfg.StateDir>/agent.sock (cfg.SocketMode,
// cfg.SocketGroup) for store, aggregating references with cfg.Linger.
// cfg.Name and cfg.OpTimeout are used as a node uses them. Wire the
// store's events to Event (etcdstore.WithEvents) so connections learn of
// lost references and removals on other hosts can ask for lingering
// references (without it, a lingering reference blocks them until the
// linger ends). Call Run once.
func NewLocalAPI(store *etcdstore.Store, cfg Config, log *slog.Logger) (*LocalAPI, error) {
	a, err := newAgent(store, cfg, log, nil)
	if err != nil {
		return nil, err
	}
	return &LocalAPI{a: a}, nil
}

// Run serves until ctx ends, then closes every connection and waits for
// their requests; the store stays open (the caller closes it after Run).
func (l *LocalAPI) Run(ctx context.Context) error { return l.a.serve(ctx) }

// Event takes the store's events (lost references, lease changes, build
// progress) to the connections concerned, and releases a lingering
// reference a removal asks for. It does not block.
func (l *LocalAPI) Event(e etcdstore.Event) { l.a.event(e) }

// Holders lists the local references to id, oldest first.
func (l *LocalAPI) Holders(id string) []Holder { return l.a.holders(id) }

// explain names etcd as the cause of an error that says only "context
// deadline exceeded" or "no leader": it asks each member for its status and
// wraps ErrNoQuorum when the members that answer have no leader, as Dial
// does for a CLI that talks to etcd itself.
func (a *server) explain(err error) error {
	if err == nil || !(errors.Is(err, context.DeadlineExceeded) || errors.Is(err, rpctypes.ErrNoLeader) || errors.Is(err, rpctypes.ErrGRPCNoLeader)) {
		return err
	}
	cli := a.store.Client()
	ctx, cancel := context.WithTimeout(context.Background(), a.opTimeout)
	defer cancel()
	if why := quorumLoss(ctx, cli, cli.Endpoints()); why != "" {
		return fmt.Errorf("%w: %s (%w)", ErrNoQuorum, why, err)
	}
	return fmt.Errorf("etcd did not answer in time (%w)", err)
}
