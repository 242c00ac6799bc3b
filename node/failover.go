package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// A frozen etcd member (a paused container, a stopped process, a host that
// stopped scheduling it) keeps its TCP connections open: the kernel still
// accepts and acknowledges what the client sends, nothing ever comes back.
// Every call and stream the client's round-robin balancer put on that
// member hangs, and gRPC's own keep-alive cannot help in time: grpc-go
// never pings more often than every 10 s, while a store's guard gives up on
// a lease after 2/3 of its TTL without a keep-alive acknowledgement (10 s
// at the default 15 s TTL, 3.3 s at 5 s).
//
// A follower is a trap too while the leader is frozen: it forwards lease
// renewals to the leader over HTTP with a 7 s deadline (etcd's request
// timeout), and serves a keep-alive stream's renewals one after the other,
// so a renewal forwarded just before the followers elect a new leader
// blocks that stream for 7 s.
//
// memberWatch keeps a client off such members, with two mechanisms:
//
//   - Probes. Every probeEvery, each endpoint gets a gRPC health check on a
//     connection of its own, with a probeTimeout deadline. A member that
//     does not answer (a live member answers in microseconds, whatever its
//     Raft state) has every connection of the client to it closed: calls
//     on them fail over (reads are retried on another member by the etcd
//     client; a write that was already sent fails, as it would have after
//     its deadline), and the balancer no longer picks the member, since a
//     new connection to it cannot complete its HTTP/2 handshake until it
//     thaws.
//   - Keep-alive stalls. A lease keep-alive stream whose oldest unanswered
//     renewal is stallAfter old is cancelled; the etcd client then opens a
//     new stream, on the next member the balancer picks, 500 ms later
//     (its retryConnWait), and sends the renewal again at once.
//
// Both are derived from the TTL (watchTiming) so that, from the moment a
// member freezes, the keep-alive is back on a live member well before the
// guard's 2/3 TTL: see docs/design.md for the measured figures.
type memberWatch struct {
	timing watchTiming
	log    *slog.Logger

	mu    sync.Mutex
	conns map[string]map[*watchedConn]struct{} // open connections by dial address
	down  map[string]time.Time                 // address -> when it was found frozen

	stalls atomic.Int64 // keep-alive streams cancelled
	downs  atomic.Int64 // times a member was found not answering
}

// watchTiming is how fast memberWatch acts.
type watchTiming struct {
	probeEvery   time.Duration
	probeTimeout time.Duration
	stallAfter   time.Duration
}

// timingFor derives the timing from the lease TTL: a frozen member is found
// within probeEvery + probeTimeout = TTL/5 (at least 0.6 s, at most 4 s), a
// stalled keep-alive is moved after TTL/9 (at least 1 s: a renewal may
// wait about that long for a new leader after an election), and the new
// stream's renewal goes out 0.5–1 s later. A renewal is due TTL/3 after the
// last acknowledgement (plus the etcd client's 0.5 s send tick), so with a
// TTL of 9 s or more a stalled one is answered on another member before the
// guard's 2/3 TTL; failoverNeeds adds the leader's election, which takes
// FailoverMinTTL.
func timingFor(ttl time.Duration) watchTiming {
	clamp := func(d, lo, hi time.Duration) time.Duration { return max(lo, min(d, hi)) }
	return watchTiming{
		probeEvery:   clamp(ttl/10, 200*time.Millisecond, 2*time.Second),
		probeTimeout: clamp(ttl/10, 400*time.Millisecond, 2*time.Second),
		stallAfter:   clamp(ttl/9, time.Second, 5*time.Second),
	}
}

// What the member watch's timing means for the TTL (docs/design.md, "A
// frozen etcd member"; README, "Operations"): the etcd client's own timing
// and etcd's default raft timing that failoverNeeds counts on.
const (
	// sendTick is the etcd client's keep-alive send loop period: a renewal
	// goes out up to this long after it is due.
	sendTick = 500 * time.Millisecond
	// reopenWait is how long the etcd client waits before it opens a new
	// keep-alive stream (its retryConnWait); the renewal follows within a
	// sendTick.
	reopenWait = 500 * time.Millisecond
	// electionTime is how long after the leader freezes the live members
	// know a new one with etcd's default raft timing: a follower gives up
	// on the leader after its election timeout (--election-timeout 1000 ms,
	// which raft randomizes to 1–2 s), then one round of pre-votes and
	// votes. Until then a follower forwards renewals to the frozen leader,
	// where they hang for etcd's request timeout (7 s).
	electionTime = 2 * time.Second
)

// failoverNeeds is the longest a lease of this TTL can go without a
// keep-alive acknowledgement when one etcd member freezes (the leader if
// leader is set), with the member watch of timingFor(ttl), in the worst
// phase, the member freezing just as a renewal is due:
//
//  1. the renewal goes out TTL/3 after the last acknowledgement, plus up to
//     a sendTick, and hangs (on the frozen member, or on a follower that
//     forwards it to the frozen leader);
//  2. it is given up after stallAfter (sooner when the probe closes the
//     frozen member's connections) and sent again on another member up to
//     reopenWait + sendTick later;
//  3. after a leader freeze, a retry that arrives before the election is
//     over (electionTime) can reach a follower that still forwards to the
//     frozen leader, and hangs again: the first retry after the election is
//     answered, at worst electionTime + step 2 after the freeze. The first
//     retry comes at least stallAfter + reopenWait after the freeze, so
//     this happens only when that is shorter than electionTime.
//
// The lease survives the freeze when this is shorter than the guard's 2/3
// TTL (etcdstore.Session).
func failoverNeeds(ttl time.Duration, leader bool) time.Duration {
	w := timingFor(ttl)
	due := ttl/3 + sendTick
	retry := w.stallAfter + reopenWait + sendTick
	if leader && w.stallAfter+reopenWait < electionTime {
		return due + electionTime + retry
	}
	return due + retry
}

// FailoverMinTTL is the shortest whole-second TTL whose lease survives a
// freeze of any one etcd member, the leader included, by failoverNeeds:
// stallAfter (TTL/9) + reopenWait must reach electionTime, so TTL/9 ≥ 1.5 s.
// With a shorter TTL (at least 8 s), a frozen follower costs nothing, but a
// leader freeze that lands as a renewal is due can cost the lease (its
// builds are cancelled, its references taken again) although quorum is
// intact. With more than one endpoint, New warns below it; a shorter TTL is
// still allowed (tests, single-member clusters).
const FailoverMinTTL = 14 * time.Second

// ttlWarning says why cfg's TTL is too short for the member watch to keep
// its lease through a frozen etcd member, or "" when it is long enough or
// there is no other member to fail over to (one endpoint, or the embedded
// etcd).
func ttlWarning(cfg *Config) string {
	if cfg.Embedded() || len(cfg.Endpoints) < 2 || cfg.TTL >= FailoverMinTTL {
		return ""
	}
	who, need := "member", failoverNeeds(cfg.TTL, false)
	if need < cfg.TTL*2/3 {
		who, need = "leader", failoverNeeds(cfg.TTL, true)
	}
	return fmt.Sprintf("TTL %v is below %v, the failover minimum: when an etcd %s freezes (a paused container, a stalled VM), "+
		"this node's lease can go up to %v without a renewal, past the %v after which it gives the lease up, so its builds are cancelled "+
		"although quorum is intact. Use --ttl %v or more (README, Operations)",
		cfg.TTL, FailoverMinTTL, who, need.Round(10*time.Millisecond), (cfg.TTL * 2 / 3).Round(10*time.Millisecond), FailoverMinTTL)
}

func newMemberWatch(ttl time.Duration, log *slog.Logger) *memberWatch {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &memberWatch{
		timing: timingFor(ttl),
		log:    log,
		conns:  map[string]map[*watchedConn]struct{}{},
		down:   map[string]time.Time{},
	}
}

// dialOptions installs the watch in a client: its dialer (so it can close
// a member's connections) and its keep-alive stream interceptor.
func (w *memberWatch) dialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithContextDialer(w.dial),
		grpc.WithChainStreamInterceptor(w.interceptStream),
	}
}

// start probes each endpoint of cli until cli is closed. Each probe loop is
// a goroutine that ends, and closes its connection, when cli.Ctx() ends.
func (w *memberWatch) start(cli *clientv3.Client, endpoints []string) {
	for _, ep := range endpoints {
		go w.probeLoop(cli, ep)
	}
}

func (w *memberWatch) probeLoop(cli *clientv3.Client, ep string) {
	conn, err := cli.Dial(ep)
	if err != nil {
		w.log.Warn("etcd member watch: cannot make a probe connection; not watching this member", "member", ep, "err", err)
		return
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	addr := dialAddr(ep)
	t := time.NewTicker(w.timing.probeEvery)
	defer t.Stop()
	for {
		select {
		case <-cli.Ctx().Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(cli.Ctx(), w.timing.probeTimeout)
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if cli.Ctx().Err() != nil {
			return
		}
		switch status.Code(err) {
		case codes.DeadlineExceeded, codes.Unavailable:
			w.memberDown(ep, addr, err)
		default: // an answer, even a refusal, means the process runs
			w.memberUp(ep, addr)
		}
	}
}

// memberDown closes every connection to addr when the member is first
// found not answering (the probe's own too). Connections made after that
// cannot finish their handshake while the member stays frozen, so the
// balancer does not use them, and they are left alone: closing them again
// would only make gRPC back off further before it reconnects after the
// thaw.
func (w *memberWatch) memberDown(ep, addr string, why error) {
	w.mu.Lock()
	if _, known := w.down[addr]; known {
		w.mu.Unlock()
		return
	}
	w.down[addr] = time.Now()
	var victims []*watchedConn
	for c := range w.conns[addr] {
		victims = append(victims, c)
	}
	w.mu.Unlock()
	for _, c := range victims {
		c.Close()
	}
	w.downs.Add(1)
	w.log.Warn("etcd member not answering; closed its connections so calls and lease keep-alives use the other members",
		"member", ep, "within", w.timing.probeTimeout, "connections", len(victims), "err", why)
}

func (w *memberWatch) memberUp(ep, addr string) {
	w.mu.Lock()
	since, known := w.down[addr]
	delete(w.down, addr)
	w.mu.Unlock()
	if known {
		w.log.Info("etcd member answering again", "member", ep, "after", time.Since(since).Round(time.Millisecond))
	}
}

// dial connects to a member's address as gRPC passes it for the etcd
// client's endpoints ("host:port", "unix:///abs/path", "unix:rel/path")
// and remembers the connection under that address.
func (w *memberWatch) dial(ctx context.Context, addr string) (net.Conn, error) {
	network, address := "tcp", addr
	switch {
	case strings.HasPrefix(addr, "unix://"):
		network, address = "unix", strings.TrimPrefix(addr, "unix://")
	case strings.HasPrefix(addr, "unix:"):
		network, address = "unix", strings.TrimPrefix(addr, "unix:")
	}
	d := net.Dialer{KeepAlive: 15 * time.Second}
	c, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	wc := &watchedConn{Conn: c, w: w, addr: addr}
	w.mu.Lock()
	if w.conns[addr] == nil {
		w.conns[addr] = map[*watchedConn]struct{}{}
	}
	w.conns[addr][wc] = struct{}{}
	w.mu.Unlock()
	return wc, nil
}

// watchedConn is a connection memberWatch can close.
type watchedConn struct {
	net.Conn
	w    *memberWatch
	addr string
	once sync.Once
}

func (c *watchedConn) Close() error {
	c.once.Do(func() {
		c.w.mu.Lock()
		delete(c.w.conns[c.addr], c)
		c.w.mu.Unlock()
	})
	return c.Conn.Close()
}

// dialAddr is the address gRPC dials for an etcd client endpoint, as the
// etcd client translates it (client/v3/internal/endpoint): http(s)://h:p
// becomes h:p, unix(s):///abs becomes unix:///abs, unix(s)://rel and
// unix(s):rel become unix:rel.
func dialAddr(ep string) string {
	for _, scheme := range []string{"unix", "unixs"} {
		if rest, ok := strings.CutPrefix(ep, scheme+"://"); ok {
			if strings.HasPrefix(rest, "/") {
				return "unix://" + rest
			}
			return "unix:" + rest
		}
		if rest, ok := strings.CutPrefix(ep, scheme+":"); ok {
			return "unix:" + rest
		}
	}
	if strings.Contains(ep, "://") {
		if u, err := url.Parse(ep); err == nil && (u.Scheme == "http" || u.Scheme == "https") {
			return u.Host
		}
	}
	return ep
}

// leaseKeepAliveMethod is the gRPC method of etcd's lease keep-alive
// stream.
const leaseKeepAliveMethod = "/etcdserverpb.Lease/LeaseKeepAlive"

// errKeepAliveStalled cancels a keep-alive stream that stopped answering.
var errKeepAliveStalled = errors.New("lease keep-alive unanswered; moving to another etcd member")

// interceptStream watches lease keep-alive streams; other streams pass
// through.
func (w *memberWatch) interceptStream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if method != leaseKeepAliveMethod {
		return streamer(ctx, desc, cc, method, opts...)
	}
	sctx, cancel := context.WithCancelCause(ctx)
	cs, err := streamer(sctx, desc, cc, method, opts...)
	if err != nil {
		cancel(nil)
		return nil, err
	}
	return &keepAliveStream{ClientStream: cs, w: w, cancel: cancel}, nil
}

// keepAliveStream times the oldest renewal still unanswered and cancels
// the stream when it is stallAfter old.
type keepAliveStream struct {
	grpc.ClientStream
	w      *memberWatch
	cancel context.CancelCauseFunc

	mu      sync.Mutex
	pending time.Time // send time of the oldest unanswered renewal; zero: none
	timer   *time.Timer
	ended   bool
}

func (s *keepAliveStream) SendMsg(m any) error {
	s.mu.Lock()
	if s.pending.IsZero() && !s.ended {
		s.pending = time.Now()
		s.timer = time.AfterFunc(s.w.timing.stallAfter, s.stalled)
	}
	s.mu.Unlock()
	return s.ClientStream.SendMsg(m)
}

func (s *keepAliveStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	s.mu.Lock()
	if err != nil {
		s.ended = true
	}
	if err != nil || !s.pending.IsZero() {
		s.pending = time.Time{}
		if s.timer != nil {
			s.timer.Stop()
		}
	}
	s.mu.Unlock()
	if err != nil {
		s.cancel(nil) // release the context
	}
	return err
}

func (s *keepAliveStream) stalled() {
	s.mu.Lock()
	since := s.pending
	fire := !s.ended && !since.IsZero() && time.Since(since) >= s.w.timing.stallAfter
	s.mu.Unlock()
	if !fire {
		return
	}
	member := "?"
	if p, ok := peer.FromContext(s.ClientStream.Context()); ok && p.Addr != nil {
		member = p.Addr.String()
	}
	s.w.stalls.Add(1)
	s.w.log.Warn("etcd lease keep-alive unanswered; reopening it on another member",
		"member", member, "waited", time.Since(since).Round(time.Millisecond))
	s.cancel(fmt.Errorf("%w (member %s)", errKeepAliveStalled, member))
}
