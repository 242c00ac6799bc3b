package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/gofrs/flock"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/internal/keys"
)

// errIdle ends Run when an embedded node has had no client for IdleTimeout.
var errIdle = errors.New("idle")

// Registration is the value of P/node/<name>/<lease>, on the node's own lease.
type Registration struct {
	Name    string    `json:"name"`
	Version string    `json:"version"`
	PID     int       `json:"pid"`
	Address string    `json:"address,omitempty"` // metrics/health address
	Root    string    `json:"root"`
	Started time.Time `json:"started"`
	// Machine is the node's os.Hostname (Name may differ), so that a
	// process on the same machine can tell whether PID is still running.
	Machine string `json:"machine,omitempty"`
}

// liveNodes holds the start times (unix ns) of this process's nodes that
// are not closed, for Registration.Gone.
var liveNodes sync.Map

// Gone reports whether the node that made the registration is known to
// have exited: it ran on this machine and its PID is no longer running
// (or is this process, started at another time). A registration lives
// until its lease expires, up to a TTL after its node was killed.
func (r Registration) Gone() bool {
	host, _ := os.Hostname()
	if r.Machine == "" || r.Machine != host {
		return false
	}
	if r.PID == os.Getpid() {
		// PIDs repeat (PID 1 in every container), but not at once: it is
		// gone unless it is a node of this process.
		_, live := liveNodes.Load(r.Started.UnixNano())
		return !live
	}
	return errors.Is(syscall.Kill(r.PID, 0), syscall.ESRCH)
}

// Node is one host's membership of a Granary cluster: an etcd client (and,
// with no endpoints, the embedded etcd it talks to), an etcdstore.Store, a
// registration key on its own lease, the GC loop, and metrics and health
// over HTTP. Make one with New, then call Run exactly once.
type Node struct {
	cfg     Config
	log     *slog.Logger
	started time.Time

	emb   *Embedded    // nil with endpoints
	flock *flock.Flock // embedded: held for the node's lifetime

	cli   *clientv3.Client
	watch *memberWatch // nil with one endpoint
	store *etcdstore.Store
	cache *cache.Remote // nil without Config.Cache
	m     *metrics

	ln  net.Listener // nil without ListenMetrics
	srv *http.Server

	reg    *registration // run by Run
	leases leaseRecord   // LeasesFile

	agent atomic.Pointer[server] // the local API; set by New

	// reconcile asks reconcileLoop for a reconciliation now (after a new
	// lease); buffered, so a request while one runs is not lost.
	reconcile chan struct{}

	closeOnce sync.Once
	closeErr  error
}

// New prepares a node: validates cfg; with no endpoints, takes the state
// directory's lock (ErrNodeRunning if another node has it) and starts the
// embedded etcd; dials etcd; opens the store on cfg.Root (refusing a root
// bound to another cluster with etcdstore.ErrForeignCluster); listens on
// ListenMetrics; and, embedded, writes node.json so clients find it. Nothing runs in the background until Run. If Run is never
// called, the caller must Close the node.
func New(ctx context.Context, cfg Config, log *slog.Logger) (_ *Node, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if w := ttlWarning(&cfg); w != "" {
		log.Warn("the lease TTL is too short to ride out a frozen etcd member", "ttl", cfg.TTL, "failover_min", FailoverMinTTL, "why", w)
	}
	n := &Node{cfg: cfg, log: log, started: time.Now(), reconcile: make(chan struct{}, 1)}
	n.reg = &registration{n: n}
	n.m = newMetrics(n)
	defer func() {
		if err != nil {
			n.Close()
			recordStartFailure(cfg.StateDir, err)
		}
	}()
	// One node per state directory, embedded or not: it owns the agent
	// socket there.
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	n.flock = flock.New(filepath.Join(cfg.StateDir, LockFile))
	ok, err := n.flock.TryLock()
	if err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if !ok {
		n.flock = nil
		return nil, fmt.Errorf("%w (%s)", ErrNodeRunning, cfg.StateDir)
	}
	if cfg.Embedded() {
		if n.emb, err = StartEmbedded(ctx, cfg.StateDir); err != nil {
			return nil, err
		}
	}
	if n.cli, n.watch, err = dial(ctx, &n.cfg, log); err != nil {
		return nil, err
	}
	opts := []etcdstore.Option{etcdstore.WithEvents(n.event), etcdstore.WithPurpose("granary node")}
	if n.cache, err = cfg.OpenCache(); err != nil {
		return nil, err
	}
	if n.cache != nil {
		n.m.registerCache(n.cache)
		opts = append(opts, etcdstore.WithCache(n.cache))
	}
	n.store, err = etcdstore.New(ctx, n.cli, cfg.Root, cfg.StoreOptions(log, opts...)...)
	if err != nil {
		return nil, err
	}
	n.leases.path = filepath.Join(cfg.StateDir, LeasesFile)
	n.endPreviousRun(ctx)
	n.recordLeases()
	ag, err := newAgent(n.store, n.cfg, n.log, n.BuildNeeds)
	if err != nil {
		return nil, err
	}
	n.agent.Store(ag)
	if cfg.ListenMetrics != "" {
		if n.ln, err = net.Listen("tcp", cfg.ListenMetrics); err != nil {
			return nil, fmt.Errorf("metrics listener: %w", err)
		}
		n.srv = &http.Server{Handler: n.handler(), ReadHeaderTimeout: 5 * time.Second}
	}
	if n.emb != nil {
		// Clients find the node by this file (ReadLocal): write it last.
		l := Local{PID: os.Getpid(), Socket: cfg.SocketPath(), Agent: cfg.AgentSocketPath(), StateDir: cfg.StateDir, Root: n.store.Root(), Metrics: n.MetricsAddr(), Started: n.started,
			CreatedRoot: n.store.CreatedRoot()}
		if err := writeLocal(l); err != nil {
			return nil, fmt.Errorf("write node info: %w", err)
		}
	}
	return n, nil
}

func (n *Node) event(e etcdstore.Event) {
	n.m.event(e)
	if e.Kind == etcdstore.EventLeaseRestored && n.store != nil {
		n.recordLeases()
	}
	if e.Kind == etcdstore.EventLeaseRestored && n.reconcile != nil {
		select {
		case n.reconcile <- struct{}{}:
		default:
		}
	}
	if a := n.agent.Load(); a != nil {
		a.event(e)
	}
	if n.cfg.Events != nil {
		n.cfg.Events(e)
	}
}

// Store returns the node's store. Builds and references taken through it
// are counted in the node's metrics and end with the node.
func (n *Node) Store() *etcdstore.Store { return n.store }

// Client returns the node's etcd client.
func (n *Node) Client() *clientv3.Client { return n.cli }

// Config returns the node's validated configuration.
func (n *Node) Config() Config { return n.cfg }

// MetricsAddr returns the address the HTTP server listens on, or "".
func (n *Node) MetricsAddr() string {
	if n.ln == nil {
		return ""
	}
	return n.ln.Addr().String()
}

// Build is the store's BuildOutcome, timed in the node's metrics (build and
// wait durations).
func (n *Node) Build(ctx context.Context, id string, builder func(context.Context) error) (etcdstore.Outcome, error) {
	out, err := n.store.Handle(id).BuildOutcome(ctx, builder)
	if err == nil {
		n.m.built(out)
	}
	return out, err
}

// BuildNeeds is the store's BuildNeedsOutcome (a build on the packages
// needs), timed in the node's metrics as Build is.
func (n *Node) BuildNeeds(ctx context.Context, id string, needs []string, builder func(context.Context) error) (etcdstore.Outcome, error) {
	out, err := n.store.Handle(id).BuildNeedsOutcome(ctx, needs, builder)
	if err == nil {
		n.m.built(out)
	}
	return out, err
}

// Run serves until ctx ends, the embedded etcd stops, or (embedded only)
// no client has used the node for IdleTimeout. It runs the GC loop, the
// sweeper of invalid packages (etcdstore's WatchInvalid: an invalidated
// package goes as soon as its last holder leaves), the
// registration P/node/<name>/<lease> on its own lease, and the HTTP server. It then
// shuts down in this order:
//
//  1. stop the GC loop, the invalid packages' sweeper and the idle watch (a
//     sweep in progress is cancelled and waited for), and the local API: its socket closes, every
//     connection is closed (its process learns at once that the node is
//     gone) and its requests are waited for;
//  2. close the store: builds running in this process are cancelled and
//     cannot publish, and the store's lease is revoked, so its references
//     and locks drop at once rather than after the TTL;
//  3. revoke the registration lease, so P/node/<name>/<lease> disappears;
//  4. stop the HTTP server;
//  5. close the etcd client;
//  6. embedded: remove node.json, stop etcd, release the state lock.
//
// Run returns nil after a requested or idle stop, and the reason otherwise.
func (n *Node) Run(ctx context.Context) error {
	liveNodes.Store(n.started.UnixNano(), true)
	defer liveNodes.Delete(n.started.UnixNano())
	rctx, stop := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	goRun := func(fn func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(rctx); err != nil {
				stop(err)
			}
		}()
	}
	reg := n.reg
	goRun(reg.run)
	goRun(n.agent.Load().serve)
	goRun(n.reconcileLoop)
	// Invalid packages go as soon as their last holder (of any host)
	// leaves; WatchInvalid returns ctx's error when the node stops.
	goRun(func(ctx context.Context) error {
		n.store.WatchInvalid(ctx) //nolint:errcheck // only ever ctx's error
		return nil
	})
	if n.cfg.GCInterval > 0 {
		goRun(n.gcLoop)
	}
	if n.emb != nil {
		if n.cfg.IdleTimeout > 0 {
			goRun(n.idleWatch)
		}
		goRun(func(ctx context.Context) error {
			select {
			case <-n.emb.Done():
				return errors.New("embedded etcd stopped")
			case <-ctx.Done():
				return nil
			}
		})
	}
	httpErr := make(chan error, 1)
	if n.srv != nil {
		go func() { httpErr <- n.srv.Serve(n.ln) }()
	}
	n.log.Info("node running", "name", n.cfg.Name, "root", n.store.Root(), "endpoints", n.cli.Endpoints(), "metrics", n.MetricsAddr())

	select {
	case <-rctx.Done():
	case err := <-httpErr:
		stop(fmt.Errorf("metrics server: %w", err))
	}
	cause := context.Cause(rctx)
	stop(nil)
	// 1. GC loop, idle watch, registration keeper (it does not revoke).
	wg.Wait()
	// 2.–6.
	err := n.shutdown(reg)
	switch {
	case errors.Is(cause, errIdle):
		n.log.Info("node idle; exiting", "idle", n.cfg.IdleTimeout)
		return err
	case errors.Is(cause, context.Canceled) && ctx.Err() != nil:
		return err
	default:
		return errors.Join(cause, err)
	}
}

func (n *Node) shutdown(reg *registration) error {
	var errs []error
	// 2. The store: builds cancelled, its lease revoked.
	if err := n.store.Close(); err != nil {
		errs = append(errs, err)
	}
	// 3. The registration.
	if err := reg.revoke(); err != nil {
		errs = append(errs, err)
	}
	// 4. HTTP.
	if n.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		n.srv.Shutdown(ctx) //nolint:errcheck // shutting down anyway
		cancel()
	}
	// 5., 6.
	if err := n.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Close releases what New acquired (store, listener, client, embedded etcd,
// state lock), in reverse order. Run calls it; call it yourself only if Run
// is never called. It is idempotent.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		var errs []error
		if a := n.agent.Load(); a != nil {
			a.ln.Close() // Run's serve has closed it already, if it ran
		}
		if n.store != nil {
			if err := n.store.Close(); err != nil {
				errs = append(errs, err)
			}
		}
		if n.cache != nil {
			n.cache.Close() // after the store: its uploads are done
		}
		if n.ln != nil {
			n.ln.Close()
		}

		if n.cli != nil {
			if err := n.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
				errs = append(errs, err)
			}
		}
		if n.emb != nil {
			removeLocal(n.cfg.StateDir)
			n.emb.Close()
		}
		if n.flock != nil {
			n.flock.Unlock()
		}
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}

// reconcileEvery is how often the node makes sure that etcd holds no
// reference on its lease that it does not know of (etcdstore.ReconcileRefs).
const reconcileEvery = time.Minute

// reconcileLoop reconciles the store's references with etcd at start,
// after every new lease, and every reconcileEvery: a reference the node
// does not track would pin its package until the node restarts. Each one
// dropped is logged by the store and counted in
// granary_refs_dropped_total.
func (n *Node) reconcileLoop(ctx context.Context) error {
	t := time.NewTicker(reconcileEvery)
	defer t.Stop()
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*n.cfg.OpTimeout)
		if _, err := n.store.ReconcileRefs(cctx); err != nil && ctx.Err() == nil {
			n.log.Warn("reconciling references with etcd failed; will try again", "err", err, "in", reconcileEvery)
		}
		cancel()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-n.reconcile:
		}
	}
}

// gcLoop prunes every GCInterval. ErrCollectorBusy (another host is
// sweeping) is normal.
func (n *Node) gcLoop(ctx context.Context) error {
	t := time.NewTicker(n.cfg.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		n.GC(ctx) //nolint:errcheck // logged and counted
	}
}

// GC runs one sweep with the configured options and records it in the
// metrics. It returns etcdstore.ErrCollectorBusy when another collector runs.
func (n *Node) GC(ctx context.Context) (etcdstore.PruneReport, error) {
	rep, err := n.store.Prune(ctx, n.cfg.GC)
	n.m.sweep(rep, err)
	switch {
	case errors.Is(err, etcdstore.ErrCollectorBusy):
		n.log.Debug("gc: another collector is sweeping")
	case err != nil && ctx.Err() == nil:
		n.log.Warn("gc sweep failed", "err", err)
	case err == nil && (len(rep.Removed) > 0 || len(rep.Orphans) > 0 || rep.TrashPending > 0 || len(rep.TrashErrors) > 0):
		n.log.Info("gc sweep", "removed", len(rep.Removed), "freed_bytes", rep.FreedBytes, "orphans", len(rep.Orphans), "in_use", len(rep.InUse),
			"trash_deleted", rep.TrashEntries, "trash_pending_files", rep.TrashPending, "trash_errors", len(rep.TrashErrors))
	}
	return rep, err
}

// idleWatch ends Run once no lease other than the node's own has existed for
// IdleTimeout: every CLI command holds a store lease while it runs, and a
// crashed one's lease outlives it by the TTL.
func (n *Node) idleWatch(ctx context.Context) error {
	every := min(n.cfg.IdleTimeout/4, 10*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, n.cfg.OpTimeout)
		resp, err := n.cli.Leases(cctx)
		cancel()
		if err != nil {
			last = time.Now() // unsure: count as busy
			continue
		}
		if n.agent.Load().active() > 0 {
			last = time.Now() // processes are connected to the local API
			continue
		}
		own := map[clientv3.LeaseID]bool{n.store.Lease(): true, 0: true}
		for _, l := range resp.Leases {
			if !own[l.ID] && l.ID != n.reg.current() {
				last = time.Now()
				break
			}
		}
		if time.Since(last) >= n.cfg.IdleTimeout {
			return errIdle
		}
	}
}

// registration keeps P/node/<name>/<lease> on the node's own
// etcdstore.Session, which renews the lease, distrusts it before the server
// could expire it, and puts the key back on a new lease after a loss.
type registration struct {
	n    *Node
	mu   sync.Mutex
	sess *etcdstore.Session // nil until run made it
}

func (r *registration) session() *etcdstore.Session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sess
}

func (r *registration) current() clientv3.LeaseID {
	if sess := r.session(); sess != nil {
		return sess.ID()
	}
	return 0
}

// key is P/node/<name>/<lease>: two nodes started with the same name (a
// copied configuration, a restart while the old registration lingers) each
// keep their own record instead of overwriting the other's.
func (r *registration) key(lease clientv3.LeaseID) string {
	return keys.Space{Prefix: r.n.cfg.Prefix}.NodeKey(r.n.cfg.Name, lease)
}

func (r *registration) namePrefix() string {
	return keys.Space{Prefix: r.n.cfg.Prefix}.NodeName(r.n.cfg.Name)
}

// run makes the session (retrying while etcd is away) and puts the
// registration on it. The session then keeps it; revoke ends it.
func (r *registration) run(ctx context.Context) error {
	n := r.n
	b := backoff.WithContext(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0)), ctx)
	sess, err := backoff.RetryNotifyWithData(func() (*etcdstore.Session, error) {
		return etcdstore.NewSession(ctx, n.cli, etcdstore.SessionConfig{
			TTL: n.cfg.TTL, OpTimeout: n.cfg.OpTimeout, Logger: n.log.With("lease", "registration"),
			OnLost: func(error) { n.m.leaseLosses.Inc() },
		})
	}, b, func(err error, next time.Duration) {
		n.log.Warn("cannot register node yet", "err", err, "retry_in", next)
	})
	if err != nil {
		return nil // Run is ending
	}
	sess.OnRenew(func(ctx context.Context, l *etcdstore.Lease) {
		r.put(ctx, l)
		n.recordLeases()
	})
	r.mu.Lock()
	r.sess = sess
	r.mu.Unlock()
	n.recordLeases()
	if l, err := sess.Current(ctx); err == nil {
		r.put(ctx, l)
	}
	return nil
}

// put writes the registration on l, retrying until it lands, l ends or
// ctx does.
func (r *registration) put(ctx context.Context, l *etcdstore.Lease) {
	n := r.n
	machine, _ := os.Hostname()
	val, _ := json.Marshal(Registration{Name: n.cfg.Name, Version: Version, PID: os.Getpid(), Address: n.MetricsAddr(), Root: n.store.Root(), Started: n.started, Machine: machine})
	b := backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0), backoff.WithMaxInterval(5*time.Second)), ctx)
	var resp *clientv3.TxnResponse
	err := backoff.RetryNotify(func() error {
		if err := l.Err(); err != nil {
			return backoff.Permanent(err) // the session puts it on the next lease
		}
		cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.OpTimeout)
		defer cancel()
		var err error
		resp, err = n.cli.Txn(cctx).Then(
			clientv3.OpGet(r.namePrefix(), clientv3.WithPrefix()),
			clientv3.OpPut(r.key(l.ID), string(val), clientv3.WithLease(l.ID)),
		).Commit()
		return err
	}, b, func(err error, next time.Duration) {
		n.log.Warn("cannot register node yet", "err", err, "retry_in", next)
	})
	if err != nil {
		return
	}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		var other Registration
		// A registration of ours from an earlier lease has our PID and
		// start time; PIDs alone repeat (PID 1 in every container).
		switch {
		case json.Unmarshal(kv.Value, &other) != nil || (other.PID == os.Getpid() && other.Started.Equal(n.started)):
		case other.Gone():
			// Our killed predecessor on this machine: its registration
			// would linger until its lease expires. Drop it.
			rctx, cancel := context.WithTimeout(ctx, n.cfg.OpTimeout)
			_, err := n.cli.Revoke(rctx, clientv3.LeaseID(kv.Lease))
			cancel()
			n.log.Info("dropped the registration of a node of the same name that is no longer running", "other_pid", other.PID, "other_started", other.Started, "err", err)
		default:
			n.log.Warn("another live node has the same name; builds and references will not tell them apart",
				"name", n.cfg.Name, "other_pid", other.PID, "other_started", other.Started, "hint", "give each node its own --host")
		}
	}
}

// revoke drops the registration at once: it closes the session, which
// revokes its leases.
func (r *registration) revoke() error {
	sess := r.session()
	if sess == nil {
		return nil
	}
	if err := sess.Close(); err != nil {
		return fmt.Errorf("revoke node registration (it expires within %v): %w", r.n.cfg.TTL, err)
	}
	return nil
}

// ReadRegistrations lists the live nodes registered under prefix.
func ReadRegistrations(ctx context.Context, cli *clientv3.Client, prefix string) ([]Registration, error) {
	resp, err := cli.Get(ctx, keys.Space{Prefix: prefix}.Kind(keys.Node), clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := make([]Registration, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var r Registration
		if json.Unmarshal(kv.Value, &r) == nil {
			out = append(out, r)
		}
	}
	return out, nil
}
