package node

import (
	"bufio"
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
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/agentwire"
	"github.com/granary-build/granary/internal/paths"
)

// AgentSocket is the file name of the node's local API socket in the state
// directory.
const AgentSocket = paths.AgentSocket

// buildFunc is the store's BuildOutcome for an ID.
type buildFunc func(ctx context.Context, id string, builder func(context.Context) error) (etcdstore.Outcome, error)

// agent is the node's local API: it serves Conns on <state>/agent.sock and
// aggregates their references, so the host holds at most one etcd reference
// per package however many local processes hold it.
//
// Ownership: Node.New makes the agent and its listener; Node.Run runs
// serve, which owns one goroutine per connection and every request
// goroutine (through wg) and, on return, has closed every connection and
// waited for all of them. Linger timers take part in wg while they release.
type agent struct {
	store     *etcdstore.Store
	log       *slog.Logger
	host      string
	opTimeout time.Duration
	linger    time.Duration
	build1    buildFunc
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
func newAgent(store *etcdstore.Store, cfg Config, log *slog.Logger, build buildFunc) (*agent, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if build == nil {
		build = func(ctx context.Context, id string, builder func(context.Context) error) (etcdstore.Outcome, error) {
			return store.Handle(id).BuildOutcome(ctx, builder)
		}
	}
	path := cfg.AgentSocketPath()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("granary: state directory: %w", err)
	}
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("granary: agent socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, cfg.SocketMode.Perm()); err != nil {
		ln.Close()
		return nil, fmt.Errorf("granary: agent socket mode: %w", err)
	}
	if cfg.SocketGroup != "" {
		gid, err := lookupGroup(cfg.SocketGroup)
		if err == nil {
			err = os.Chown(path, -1, gid)
		}
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("granary: agent socket group %q: %w", cfg.SocketGroup, err)
		}
	}
	if cfg.SocketMode.Perm()&0o077 != 0 {
		// Others than the node's user may connect: they must be able to
		// reach the socket, not list or read the state directory.
		if st, err := os.Stat(cfg.StateDir); err == nil && st.Mode().Perm()&0o011 != 0o011 {
			if err := os.Chmod(cfg.StateDir, st.Mode().Perm()|0o011); err != nil {
				ln.Close()
				return nil, fmt.Errorf("granary: state directory mode: %w", err)
			}
		}
	}
	a := &agent{
		store: store, log: log, host: cfg.Name, opTimeout: cfg.OpTimeout, linger: cfg.Linger, build1: build, ln: ln, path: path,
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
func (a *agent) active() int {
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
func (a *agent) serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { a.ln.Close() })
	defer stop()
	var err error
	for {
		c, aerr := a.ln.AcceptUnix()
		if aerr != nil {
			if ctx.Err() == nil {
				err = fmt.Errorf("granary: agent socket: %w", aerr)
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

// agentConn is one client connection.
type agentConn struct {
	a        *agent
	c        *net.UnixConn
	uid, pid int
	since    time.Time
	ctx      context.Context // ends when the connection does
	cancel   context.CancelFunc

	wmu sync.Mutex
	bw  *bufio.Writer
	buf []byte // the message being written

	mu      sync.Mutex
	purpose string
	refs    map[string][]time.Time // since of each local reference, by package
	builds  map[uint64]*serverBuild
	increfs map[string]int // IncRefs that went to the store (they may wait for a build), by package
}

// serverBuild is one build request of a connection.
type serverBuild struct {
	id     string
	pgid   atomic.Int64 // the builder's process group, while it runs (0: none reported)
	cancel context.CancelFunc
	result chan error // the builder's result, from opBuilt
}

func (a *agent) newConn(ctx context.Context, c *net.UnixConn) *agentConn {
	uid, pid, err := peerCred(c)
	if err != nil {
		a.log.Debug("agent: no peer credentials", "err", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	ac := &agentConn{a: a, c: c, uid: uid, pid: pid, since: time.Now(), ctx: cctx, cancel: cancel,
		refs: make(map[string][]time.Time), builds: make(map[uint64]*serverBuild), increfs: make(map[string]int)}
	ac.bw = bufio.NewWriter(c)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		cancel()
		return nil
	}
	a.conns[ac] = struct{}{}
	return ac
}

// send writes one message; a write error closes the connection.
func (c *agentConn) send(m msg) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.buf = appendMsg(c.buf[:0], &m)
	if _, err := c.bw.Write(c.buf); err == nil {
		err = c.bw.Flush()
		if err == nil {
			return
		}
	}
	c.c.Close()
}

func (c *agentConn) reply(seq uint64, err error, fill func(*msg)) {
	err = c.a.explain(err)
	m := wire(agentwire.Msg{Op: opReply, Seq: seq, OK: err == nil})
	if err != nil {
		m.Err = err.Error()
		m.Codes = errCodes(err)
	}
	if fill != nil {
		fill(&m)
	}
	c.send(m)
}

// run reads requests until the connection ends, then releases everything
// the connection held: its references at once (the host's etcd reference
// after the linger), its builds cancelled (an attempt whose builder ran in
// this process is abandoned).
func (c *agentConn) run() {
	a := c.a
	var reqs sync.WaitGroup
	defer func() {
		c.cancel()
		c.c.Close()
		reqs.Wait()
		c.releaseAll()
		a.mu.Lock()
		delete(a.conns, c)
		a.mu.Unlock()
	}()
	lr := agentwire.NewLineReader(c.c)
	for {
		var m msg
		line, err := lr.Next()
		if err == nil {
			err = decodeMsg(line, &m)
		}
		if err != nil {
			return
		}
		switch m.Op {
		case opHello:
			c.mu.Lock()
			c.purpose = m.Purpose
			c.mu.Unlock()
			st := a.store
			c.send(wire(agentwire.Msg{Op: opReply, Seq: m.Seq, OK: true, Hello: &helloInfo{
				Version: agentProtoVersion, Host: a.host, PID: os.Getpid(),
				Root: st.Root(), Prefix: st.Prefix(), UID: c.uid, Linger: a.linger}}))
		case opIncRef:
			if a.refs.tryFast(m.ID) {
				c.addRef(m.ID)
				c.reply(m.Seq, nil, nil)
				continue
			}
			reqs.Add(1)
			c.mu.Lock()
			c.increfs[m.ID]++
			c.mu.Unlock()
			go func() {
				defer reqs.Done()
				err := a.refs.take(c.ctx, m.ID)
				c.mu.Lock()
				if c.increfs[m.ID]--; c.increfs[m.ID] == 0 {
					delete(c.increfs, m.ID)
				}
				c.mu.Unlock()
				if err == nil && !c.addRef(m.ID) {
					a.refs.drop(m.ID) //nolint:errcheck // the connection ended meanwhile; held, so it cannot fail
				}
				c.reply(m.Seq, err, nil)
			}()
		case opDecRef:
			if err := core.ValidateID(m.ID); err != nil {
				c.reply(m.Seq, fmt.Errorf("granary: decref %q: %w", m.ID, err), nil)
				continue
			}
			if !c.dropRef(m.ID) {
				if m.Seq != 0 {
					c.reply(m.Seq, fmt.Errorf("granary: decref %q: %w", m.ID, etcdstore.ErrNoRef), nil)
				}
				continue
			}
			if a.linger > 0 {
				a.refs.drop(m.ID) //nolint:errcheck // in memory only; held, so it cannot fail
				if m.Seq != 0 {
					c.reply(m.Seq, nil, nil)
				}
				continue
			}
			reqs.Add(1)
			go func() {
				defer reqs.Done()
				c.reply(m.Seq, a.refs.drop(m.ID), nil)
			}()
		case opTryRemove:
			reqs.Add(1)
			go func() {
				defer reqs.Done()
				ok, err := a.refs.remove(c.ctx, m.ID)
				c.reply(m.Seq, err, func(r *msg) { r.OK = ok && err == nil })
			}()
		case opInspect:
			reqs.Add(1)
			go func() {
				defer reqs.Done()
				// Other hosts' nodes say how many of their jobs hold it.
				info, err := a.store.AskHolders(c.ctx, m.ID, etcdstore.DefaultHoldersWait)
				c.reply(m.Seq, err, func(r *msg) {
					if err == nil {
						r.Info = &info
						r.Holders = a.holders(m.ID)
					}
				})
			}()
		case opBuild:
			b := &serverBuild{id: m.ID, result: make(chan error, 1)}
			bctx, cancel := context.WithCancel(c.ctx)
			b.cancel = cancel
			c.mu.Lock()
			c.builds[m.Seq] = b
			c.mu.Unlock()
			reqs.Add(1)
			go func() {
				defer reqs.Done()
				// The builder runs in the caller's process: the build
				// record names it, not the node.
				c.mu.Lock()
				who := etcdstore.BuilderProcess{PID: c.pid, Command: c.purpose}
				c.mu.Unlock()
				out, err := a.build(etcdstore.WithBuilderProcess(bctx, who), c, m.Seq, m.ID, b)
				cancel()
				c.mu.Lock()
				delete(c.builds, m.Seq)
				c.mu.Unlock()
				c.reply(m.Seq, err, func(r *msg) {
					if err == nil {
						r.Outcome = &out
					}
				})
			}()
		case opBye:
			c.releaseAll()
			c.reply(m.Seq, nil, nil)
		case opCancel:
			c.mu.Lock()
			if b := c.builds[m.Seq]; b != nil {
				b.cancel()
			}
			c.mu.Unlock()
		case opBuilderPG:
			c.mu.Lock()
			if b := c.builds[m.Seq]; b != nil && m.PID > 1 {
				b.pgid.Store(int64(m.PID))
			}
			c.mu.Unlock()
		case opBuilt:
			c.mu.Lock()
			b := c.builds[m.Seq]
			c.mu.Unlock()
			if b != nil {
				b.pgid.Store(0) // it returned; the group may be gone and its number reused
				var err error
				if m.Err != "" || len(m.Codes) > 0 {
					err = builderErr(m)
				}
				select {
				case b.result <- err:
				default:
				}
			}
		default:
			c.reply(m.Seq, fmt.Errorf("granary: unknown operation %q", m.Op), nil)
		}
	}
}

// builderErr is the error a builder in the caller's process returned.
func builderErr(m msg) error {
	err := errors.New(m.Err)
	for _, c := range m.Codes {
		if c == "abandon" {
			return fmt.Errorf("%w: %w", etcdstore.ErrAbandon, err)
		}
	}
	return err
}

// releaseAll drops every reference of c; c takes no more.
func (c *agentConn) releaseAll() {
	c.mu.Lock()
	refs := c.refs
	c.refs = nil
	c.mu.Unlock()
	for id, rs := range refs {
		for range rs {
			c.a.refs.drop(id) //nolint:errcheck // logged by the store; the lease covers it
		}
	}
}

// addRef records a local reference of c; false if c has ended.
func (c *agentConn) addRef(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refs == nil {
		return false
	}
	c.refs[id] = append(c.refs[id], time.Now())
	return true
}

// dropRef forgets c's newest reference to id; false if it holds none.
func (c *agentConn) dropRef(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	rs := c.refs[id]
	if len(rs) == 0 {
		return false
	}
	if len(rs) == 1 {
		delete(c.refs, id)
	} else {
		c.refs[id] = rs[:len(rs)-1]
	}
	return true
}

// holders lists the local references to id, oldest first.
func (a *agent) holders(id string) []Holder {
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
func (a *agent) tellLost(id string, cause error) {
	a.mu.Lock()
	conns := a.connsLocked()
	a.mu.Unlock()
	for _, c := range conns {
		c.mu.Lock()
		n := len(c.refs[id])
		c.mu.Unlock()
		if n > 0 {
			c.send(wire(agentwire.Msg{Op: opRefLost, ID: id, Err: fmt.Sprint(cause)}))
		}
	}
}

func (a *agent) connsLocked() []*agentConn {
	out := make([]*agentConn, 0, len(a.conns))
	for c := range a.conns {
		out = append(out, c)
	}
	return out
}

// broadcast sends m to every connection, from a goroutine of its own (it
// is called from the store's event hook, which must not block).
func (a *agent) broadcast(m msg) {
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
			c.send(m)
		}
	}()
}

// event is the agent's share of the store's events.
func (a *agent) event(e etcdstore.Event) {
	switch e.Kind {
	case etcdstore.EventRefLost:
		a.refs.refLost(e.ID, e.Err)
	case etcdstore.EventYieldRequested:
		a.refs.yield(e.ID, e.Host)
	case etcdstore.EventHoldersRequested:
		a.refs.census(e.ID)
	case etcdstore.EventLeaseLost:
		a.broadcast(wire(agentwire.Msg{Op: opLeaseLost, Err: fmt.Sprint(e.Err)}))
	case etcdstore.EventLeaseRestored:
		a.broadcast(wire(agentwire.Msg{Op: opLeaseBack}))
	case etcdstore.EventWaiting, etcdstore.EventLockDelay, etcdstore.EventFailed, etcdstore.EventCacheHit,
		etcdstore.EventCacheMiss, etcdstore.EventPublished, etcdstore.EventCacheStored, etcdstore.EventCacheUploadFailed,
		etcdstore.EventLastFailed: // the builder says "the last attempt failed", as without a node
		a.toBuilders(e)
	}
}

// toBuilders sends a build's event to the connections building its
// package or waiting for it in IncRef, from a goroutine of its own.
func (a *agent) toBuilders(e etcdstore.Event) {
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
		m := msg{Msg: agentwire.Msg{Op: opEvent, ID: e.ID}, Event: toWire(e)}
		for _, c := range to {
			c.send(m)
		}
	}()
}

// build runs one build request of c: the store's BuildContext (one flight
// per ID on this host), whose builder asks c's process to run its own
// builder and waits for the result. If the attempt was abandoned because
// another caller's process went away mid-build, it tries again with c's
// builder.
func (a *agent) build(ctx context.Context, c *agentConn, seq uint64, id string, b *serverBuild) (etcdstore.Outcome, error) {
	for {
		var ran atomic.Bool
		out, err := a.build1(ctx, id, func(bctx context.Context) error {
			ran.Store(true)
			return c.runBuilder(bctx, seq, b)
		})
		if err != nil && !ran.Load() && errors.Is(err, etcdstore.ErrAbandon) && ctx.Err() == nil {
			continue // another caller's builder gave up; try with ours
		}
		return out, err
	}
}

// runBuilder asks c's process to run the builder of build request seq and
// waits for its result. If bctx ends first it tells the process to stop
// the builder and waits until it has; if the process goes away, the
// attempt is abandoned.
func (c *agentConn) runBuilder(bctx context.Context, seq uint64, b *serverBuild) error {
	gone := func() error {
		// No builder outlives its attempt: kill the group the caller
		// reported (its builder's processes, left behind by its death).
		if pg := int(b.pgid.Swap(0)); pg > 1 {
			if err := killGroup(pg); err != nil {
				c.a.log.Warn("agent: cannot kill the builder of a caller that went away", "pgid", pg, "err", err)
			}
		}
		return fmt.Errorf("%w: the caller's process (pid %d) went away mid-build", etcdstore.ErrAbandon, c.pid)
	}
	c.send(wire(agentwire.Msg{Op: opBuildNow, Seq: seq}))
	select {
	case err := <-b.result:
		return err
	case <-c.ctx.Done():
		return gone()
	case <-bctx.Done():
	}
	c.send(wire(agentwire.Msg{Op: opBuildStop, Seq: seq}))
	select {
	case err := <-b.result:
		if err == nil {
			err = context.Cause(bctx)
		}
		return err
	case <-c.ctx.Done():
		return gone()
	}
}

// LocalAPI is the node's local API served for a store outside a Node: for
// programs that embed a store and want to serve their host's processes,
// and for benchmarks. Node.New makes one itself; do not serve two for one
// state directory.
type LocalAPI struct{ a *agent }

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
func (a *agent) explain(err error) error {
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
