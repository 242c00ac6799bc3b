package node

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
)

// agentConn is one client connection of the local API. Its reader (run)
// dispatches each request to one handler per operation (handle); handlers
// that may block on etcd run in a goroutine of their own, counted by reqs,
// so that slow requests do not hold up fast ones.
type agentConn struct {
	a        *server
	c        *net.UnixConn
	uid, pid int
	since    time.Time
	ctx      context.Context // ends when the connection does
	cancel   context.CancelFunc
	reqs     sync.WaitGroup // request goroutines; run waits for them

	wmu sync.Mutex
	bw  *bufio.Writer
	buf []byte // the message being written

	mu      sync.Mutex
	purpose string
	refs    map[string][]time.Time // since of each local reference, by package; nil once released
	builds  map[uint64]*serverBuild
	increfs map[string]int // IncRefs that went to the store (they may wait for a build), by package
}

// serverBuild is one build request of a connection. It stays in the
// connection's builds while the store's build for it runs or a runBuilder
// waits for its OpBuilt: when the caller gives up, the store's build
// returns at once, but the attempt still waits for the builder that its
// stop (OpBuildStop) ends, and that builder's result must reach it.
type serverBuild struct {
	id     string
	needs  []string
	pgid   atomic.Int64 // the builder's process group, while it runs (0: none reported)
	cancel context.CancelFunc
	result chan error // the builder's result, from OpBuilt

	settled bool // guarded by agentConn.mu: the store's build has returned
	running int  // guarded by agentConn.mu: runBuilder calls waiting for OpBuilt
}

func (a *server) newConn(ctx context.Context, c *net.UnixConn) *agentConn {
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
func (c *agentConn) send(m *agent.Msg) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.buf = agent.AppendMsg(c.buf[:0], m)
	if _, err := c.bw.Write(c.buf); err == nil {
		if err = c.bw.Flush(); err == nil {
			return
		}
	}
	c.c.Close()
}

// reply answers request seq with err (explained, and its sentinels named
// in Codes); fill, if not nil, adds to the answer.
func (c *agentConn) reply(seq uint64, err error, fill func(*agent.Msg)) {
	err = c.a.explain(err)
	if fill != nil {
		m := answer(seq, err)
		fill(&m)
		c.send(&m)
		return
	}
	m := answer(seq, err) // not filled: it stays on the stack (the hot path's replies)
	c.send(&m)
}

// answer is the reply to request seq with err.
func answer(seq uint64, err error) agent.Msg {
	m := agent.Msg{Op: agent.OpReply, Seq: seq, OK: err == nil}
	if err != nil {
		m.Err, m.Codes = err.Error(), wireCodes(err)
	}
	return m
}

// async runs a request's handler in a goroutine of its own.
func (c *agentConn) async(f func()) {
	c.reqs.Add(1)
	go func() {
		defer c.reqs.Done()
		f()
	}()
}

// run reads requests until the connection ends, then releases everything
// the connection held: its references at once (the host's etcd reference
// after the linger), its builds cancelled (an attempt whose builder ran in
// this process is abandoned).
func (c *agentConn) run() {
	defer c.finish()
	lr := agent.NewLineReader(c.c)
	var m agent.Msg // each request in turn; handlers that outlive handle copy it
	for {
		line, err := lr.Next()
		if err == nil {
			err = agent.Decode(line, &m)
		}
		if err != nil {
			return
		}
		c.handle(&m)
	}
}

// finish ends the connection once its reader has returned.
func (c *agentConn) finish() {
	c.cancel()
	c.c.Close()
	c.reqs.Wait()
	c.releaseAll()
	c.a.mu.Lock()
	delete(c.a.conns, c)
	c.a.mu.Unlock()
}

// handle dispatches one request: one handler per operation. m is valid
// until handle returns.
func (c *agentConn) handle(m *agent.Msg) {
	switch m.Op {
	case agent.OpIncRef:
		c.incRef(m.Seq, m.ID)
	case agent.OpDecRef:
		c.decRef(m.Seq, m.ID)
	default:
		c.handleOther(*m)
	}
}

// handleOther is handle for the operations off the hot path, on a copy of
// the request that their goroutines may keep.
func (c *agentConn) handleOther(msg agent.Msg) {
	m := &msg
	switch m.Op {
	case agent.OpHello:
		c.hello(m)
	case agent.OpTryRemove:
		c.async(func() { c.tryRemove(m) })
	case agent.OpInspect:
		c.async(func() { c.inspect(m) })
	case agent.OpPin:
		c.async(func() { c.pin(m) })
	case agent.OpUnpin:
		c.async(func() { c.unpin(m) })
	case agent.OpInvalidate:
		c.async(func() { c.invalidate(m) })
	case agent.OpWhy:
		c.async(func() { c.why(m) })
	case agent.OpBuild:
		c.startBuild(m)
	case agent.OpBye:
		c.bye(m)
	case agent.OpCancel:
		c.cancelBuild(m)
	case agent.OpBuilderPG:
		c.builderPG(m)
	case agent.OpBuilt:
		c.built(m)
	default:
		c.reply(m.Seq, fmt.Errorf("%w %q", agent.ErrUnknownOp, m.Op), nil)
	}
}

// hello records the connection's purpose and answers with the node's
// side of the handshake.
func (c *agentConn) hello(m *agent.Msg) {
	c.mu.Lock()
	c.purpose = m.Purpose
	c.mu.Unlock()
	a := c.a
	c.send(&agent.Msg{Op: agent.OpReply, Seq: m.Seq, OK: true, Hello: &agent.Hello{
		Version: agent.Version, Host: a.host, PID: os.Getpid(),
		Root: a.store.Root(), Prefix: a.store.Prefix(), UID: c.uid, Linger: a.linger}})
}

// incRef grants a local reference: from memory when the host's etcd
// reference is proven, else after taking or confirming it (in the
// background: it may wait for a build).
func (c *agentConn) incRef(seq uint64, id string) {
	if c.a.refs.tryFast(id) {
		c.addRef(id)
		c.reply(seq, nil, nil)
		return
	}
	c.mu.Lock()
	c.increfs[id]++
	c.mu.Unlock()
	c.async(func() { c.reply(seq, c.take(id), nil) })
}

// take takes the host's reference to id for a local one of c.
func (c *agentConn) take(id string) error {
	err := c.a.refs.take(c.ctx, id)
	c.mu.Lock()
	if c.increfs[id]--; c.increfs[id] == 0 {
		delete(c.increfs, id)
	}
	c.mu.Unlock()
	if err == nil && !c.addRef(id) {
		c.a.refs.drop(id) //nolint:errcheck // the connection ended meanwhile; held, so it cannot fail
	}
	return err
}

// decRef drops c's newest reference to id. With a linger it only counts
// down in memory; without one, the last local reference's release waits
// for etcd (in the background).
func (c *agentConn) decRef(seq uint64, id string) {
	if err := core.ValidateID(id); err != nil {
		c.reply(seq, fmt.Errorf("decref: %w", err), nil)
		return
	}
	if !c.dropRef(id) {
		c.reply(seq, fmt.Errorf("decref %q: %w", id, core.ErrNoRef), nil)
		return
	}
	if c.a.linger > 0 {
		c.a.refs.drop(id) //nolint:errcheck // in memory only; held, so it cannot fail
		c.reply(seq, nil, nil)
		return
	}
	c.async(func() { c.reply(seq, c.a.refs.drop(id), nil) })
}

// tryRemove removes the package unless something holds it (privileged).
func (c *agentConn) tryRemove(m *agent.Msg) {
	if !c.a.priv.allowed(c.uid, c.pid) {
		c.reply(m.Seq, c.a.priv.refuse("rm", m.ID, "remove packages"), nil)
		return
	}
	ok, err := c.a.refs.remove(c.ctx, m.ID)
	c.reply(m.Seq, err, func(r *agent.Msg) { r.OK = ok && err == nil })
}

// inspect answers the package's record (other hosts' nodes say how many
// of their jobs hold it) and its local holders.
func (c *agentConn) inspect(m *agent.Msg) {
	info, err := c.a.store.AskHolders(c.ctx, m.ID, etcdstore.DefaultHoldersWait)
	c.reply(m.Seq, err, func(r *agent.Msg) {
		if err == nil {
			wi := recast[agent.Info](info)
			r.Info, r.Holders = &wi, c.a.holders(m.ID)
		}
	})
}

// bye releases every reference of c before it answers.
func (c *agentConn) bye(m *agent.Msg) {
	c.releaseAll()
	c.reply(m.Seq, nil, nil)
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

// startBuild starts build request m: the store's build, whose builder
// runs in c's process. The build record names that process, not the node.
func (c *agentConn) startBuild(m *agent.Msg) {
	b := &serverBuild{id: m.ID, needs: m.Needs, result: make(chan error, 1)}
	bctx, cancel := context.WithCancel(c.ctx)
	b.cancel = cancel
	c.mu.Lock()
	c.builds[m.Seq] = b
	who := etcdstore.BuilderProcess{PID: c.pid, Command: c.purpose}
	c.mu.Unlock()
	c.async(func() {
		out, err := c.a.build(etcdstore.WithBuilderProcess(bctx, who), c, m.Seq, m.ID, b)
		cancel()
		c.mu.Lock()
		b.settled = true
		c.forgetBuildLocked(m.Seq, b)
		c.mu.Unlock()
		c.reply(m.Seq, err, func(r *agent.Msg) {
			if err == nil {
				wo := recast[agent.Outcome](out)
				r.Outcome = &wo
			}
		})
	})
}

// forgetBuildLocked drops build request seq once neither the store's build
// nor a builder's result needs it. c.mu is held.
func (c *agentConn) forgetBuildLocked(seq uint64, b *serverBuild) {
	if b.settled && b.running == 0 && c.builds[seq] == b {
		delete(c.builds, seq)
	}
}

// buildOf returns c's build request seq, or nil.
func (c *agentConn) buildOf(seq uint64) *serverBuild {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.builds[seq]
}

// cancelBuild: the caller gave up build request m.Seq.
func (c *agentConn) cancelBuild(m *agent.Msg) {
	if b := c.buildOf(m.Seq); b != nil {
		b.cancel()
	}
}

// builderPG records the process group of build request m.Seq's builder.
func (c *agentConn) builderPG(m *agent.Msg) {
	if b := c.buildOf(m.Seq); b != nil && m.PID > 1 {
		b.pgid.Store(int64(m.PID))
	}
}

// built takes the result of build request m.Seq's builder.
func (c *agentConn) built(m *agent.Msg) {
	b := c.buildOf(m.Seq)
	if b == nil {
		return
	}
	b.pgid.Store(0) // it returned; the group may be gone and its number reused
	select {
	case b.result <- builderErr(m):
	default:
	}
}

// build runs one build request of c: the store's BuildContext (one flight
// per ID on this host), whose builder asks c's process to run its own
// builder and waits for the result. If the attempt was abandoned because
// another caller's process went away mid-build, it tries again with c's
// builder.
func (a *server) build(ctx context.Context, c *agentConn, seq uint64, id string, b *serverBuild) (etcdstore.Outcome, error) {
	for {
		var ran atomic.Bool
		out, err := a.build1(ctx, id, b.needs, func(bctx context.Context) error {
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
	if err := c.giveDirs(b.id); err != nil {
		return err
	}
	c.mu.Lock()
	// b stays in builds until its OpBuilt came, so that built finds it;
	// it is put back if the store's build returned before the attempt
	// called its builder (sequence numbers are never reused).
	b.running++
	c.builds[seq] = b
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		b.running--
		c.forgetBuildLocked(seq, b)
		c.mu.Unlock()
	}()
	c.send(&agent.Msg{Op: agent.OpBuildNow, Seq: seq})
	select {
	case err := <-b.result:
		return err
	case <-c.ctx.Done():
		return c.builderGone(b)
	case <-bctx.Done():
	}
	c.send(&agent.Msg{Op: agent.OpBuildStop, Seq: seq})
	select {
	case err := <-b.result:
		if err == nil {
			err = context.Cause(bctx)
		}
		return err
	case <-c.ctx.Done():
		return c.builderGone(b)
	}
}

// giveDirs hands the attempt's output and log directories, which the node
// made, to the caller's user when the node runs as root and the caller is
// another user: the builder runs in the caller's process and writes there.
// Only the two directories, fresh and empty, change owner (Lchown: never
// through a link).
func (c *agentConn) giveDirs(id string) error {
	if os.Geteuid() != 0 || c.uid <= 0 || c.uid == os.Geteuid() {
		return nil
	}
	h := c.a.store.Handle(id)
	for _, dir := range []string{h.OutputDirectory(), h.LoggingDirectory()} {
		if err := os.Lchown(dir, c.uid, -1); err != nil {
			return fmt.Errorf("give the build's directory to uid %d: %w", c.uid, err)
		}
	}
	return nil
}

// builderGone is the end of a build whose caller's process went away: no
// builder outlives its attempt, so the group the caller reported (its
// builder's processes, left behind by its death) is killed.
func (c *agentConn) builderGone(b *serverBuild) error {
	if pg := int(b.pgid.Swap(0)); pg > 1 {
		if err := killGroup(pg); err != nil {
			c.a.log.Warn("agent: cannot kill the builder of a caller that went away", "pgid", pg, "err", err)
		}
	}
	return fmt.Errorf("%w: the caller's process (pid %d) went away mid-build", etcdstore.ErrAbandon, c.pid)
}
