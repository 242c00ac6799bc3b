package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/internal/keys"
)

// ClientConfig turns c into an etcd client configuration for endpoints:
// TLS from CACert/Cert/Key, user and password (from PasswordFile if set),
// and HTTP/2 keep-alive pings every 10 s (gRPC's minimum, above the
// server's 5 s) answered within TTL/5 (1 to 5 s). Those pings are only a
// backstop for dead connections; Dial adds the member watch that moves
// calls and lease keep-alives off a frozen member within the TTL's margin.
func (c *Config) ClientConfig(endpoints []string) (clientv3.Config, error) {
	password, err := c.password()
	if err != nil {
		return clientv3.Config{}, err
	}
	cc := clientv3.Config{
		Endpoints:            endpoints,
		DialTimeout:          c.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: max(time.Second, min(c.TTL/5, 5*time.Second)),
		Username:             c.User,
		Password:             password,
		Logger:               zap.NewNop(),
	}
	if c.CACert != "" || c.Cert != "" {
		ti := transport.TLSInfo{CertFile: c.Cert, KeyFile: c.Key, TrustedCAFile: c.CACert}
		tc, err := ti.ClientConfig()
		if err != nil {
			return cc, fmt.Errorf("TLS configuration: %w", err)
		}
		cc.TLS = tc
	}
	return cc, nil
}

// Dial returns a client of endpoints (c.Endpoints, or the embedded node's
// socket when there are none) and checks that etcd answers within
// OpTimeout. The caller must Close it.
//
// With more than one endpoint, the client watches the members (failover.go):
// a member that stops answering (frozen, paused, cut off) has its
// connections closed within TTL/5, so calls go to the others, and a lease
// keep-alive left unanswered for TTL/6 is reopened on another member. Both
// stop when the client is closed.
func Dial(ctx context.Context, c *Config) (*clientv3.Client, error) {
	cli, _, err := dial(ctx, c, nil)
	return cli, err
}

// dial is Dial with a logger for the member watch (nil: no log); it also
// returns the watch (nil with one endpoint).
func dial(ctx context.Context, c *Config, log *slog.Logger) (*clientv3.Client, *memberWatch, error) {
	eps := c.Endpoints
	if c.Embedded() {
		eps = []string{c.LocalEndpoint()}
	}
	cc, err := c.ClientConfig(eps)
	if err != nil {
		return nil, nil, err
	}
	var watch *memberWatch
	if len(eps) > 1 {
		watch = newMemberWatch(c.TTL, log)
		cc.DialOptions = append(cc.DialOptions, watch.dialOptions()...)
	}
	cli, err := clientv3.New(cc)
	if err != nil {
		return nil, nil, fmt.Errorf("etcd client for %v: %w", eps, err)
	}
	if watch != nil {
		watch.start(cli, eps)
	}
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), c.OpTimeout)
	defer cancel()
	if _, err := cli.Get(cctx, keys.Space{Prefix: c.Prefix}.HealthKey(), clientv3.WithCountOnly()); err != nil {
		if why := quorumLoss(ctx, cli, eps); why != "" {
			cli.Close()
			return nil, nil, fmt.Errorf("%w: %s", ErrNoQuorum, why)
		}
		cli.Close()
		if errors.Is(err, rpctypes.ErrPermissionDenied) || errors.Is(err, rpctypes.ErrUserNotFound) ||
			errors.Is(err, rpctypes.ErrAuthFailed) || errors.Is(err, rpctypes.ErrInvalidAuthToken) {
			who := "the client certificate's CN"
			if c.User != "" {
				who = fmt.Sprintf("user %q", c.User)
			}
			return nil, nil, fmt.Errorf("%w: etcd at %v refused %s read access to the prefix %q: %v (etcd auth: the user needs a role with read-write on the prefix)",
				ErrPermission, eps, who, c.Prefix, err)
		}
		why := err.Error()
		if d := diagnose(eps, cc.TLS); d != "" {
			why += "; " + d
		}
		return nil, nil, fmt.Errorf("%w: %v within %v: %s", ErrUnreachable, eps, c.OpTimeout, why)
	}
	return cli, watch, nil
}

// diagnose looks for the cause that gRPC hides behind "context deadline
// exceeded": it dials the first endpoint itself and, with TLS, completes a
// handshake and waits briefly for the server's alert (TLS 1.3 servers reject
// a client certificate after the client's handshake has finished). It
// returns "" when it finds nothing wrong.
func diagnose(eps []string, tc *tls.Config) string {
	if len(eps) == 0 {
		return ""
	}
	ep := eps[0]
	if !strings.Contains(ep, "://") {
		ep = "tcp://" + ep // host:port, as etcd's clients accept it
	}
	u, err := url.Parse(ep)
	if err != nil || u.Host == "" || u.Scheme == "unix" || u.Scheme == "unixs" {
		return ""
	}
	const timeout = 2 * time.Second
	conn, err := net.DialTimeout("tcp", u.Host, timeout)
	if err != nil {
		return fmt.Sprintf("%s: %v", eps[0], err)
	}
	defer conn.Close()
	if tc == nil {
		return ""
	}
	tc = tc.Clone()
	if tc.ServerName == "" {
		tc.ServerName = u.Hostname()
	}
	tlsConn := tls.Client(conn, tc)
	tlsConn.SetDeadline(time.Now().Add(timeout))
	if err := tlsConn.Handshake(); err != nil {
		return fmt.Sprintf("%s: TLS handshake: %v", eps[0], err)
	}
	// An HTTP/2 server waits for our preface: a timeout here means the
	// handshake was accepted.
	tlsConn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	var b [1]byte
	if _, err := tlsConn.Read(b[:]); err != nil {
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			return fmt.Sprintf("%s: TLS: %v (etcd wants a client certificate signed by a CA it trusts: --cert, --key)", eps[0], err)
		}
	}
	return ""
}

// OpenCache opens the remote cache c.Cache names (with c.CacheToken,
// c.CacheCACert, the signing and trusted keys and the fetch budget), or
// returns nil, nil when there is none. It reads the signing key file but
// does no network I/O. The caller must Close it after the stores that use
// it.
func (c *Config) OpenCache(extra ...cache.Option) (*cache.Remote, error) {
	if c.Cache == "" {
		return nil, nil
	}
	var opts []cache.Option
	if c.CacheSignKey != "" {
		k, err := cache.ReadSecretKeyFile(c.CacheSignKey)
		if err != nil {
			return nil, err
		}
		opts = append(opts, cache.WithSignKey(k))
	}
	if c.CacheTrustedKeys != "" {
		keys, err := cache.ParsePublicKeys(c.CacheTrustedKeys)
		if err != nil {
			return nil, fmt.Errorf("trusted cache keys: %w", err)
		}
		if len(keys) == 0 {
			return nil, fmt.Errorf("trusted cache keys %q list no key", c.CacheTrustedKeys)
		}
		opts = append(opts, cache.WithTrustedKeys(keys...))
	}
	if c.CacheFetchBudget > 0 {
		opts = append(opts, cache.WithFetchBudget(c.CacheFetchBudget))
	}
	if c.CacheToken != "" {
		opts = append(opts, cache.WithBearerToken(c.CacheToken))
	}
	if c.CacheCACert != "" {
		opts = append(opts, cache.WithCAFile(c.CacheCACert))
	}
	return cache.Open(c.Cache, append(opts, extra...)...)
}

// StoreOptions are the etcdstore options c implies, followed by extra.
func (c *Config) StoreOptions(logger *slog.Logger, extra ...etcdstore.Option) []etcdstore.Option {
	opts := []etcdstore.Option{
		etcdstore.WithPrefix(c.Prefix),
		etcdstore.WithTTL(c.TTL),
		etcdstore.WithHost(c.Name),
		etcdstore.WithOpTimeout(c.OpTimeout),
		etcdstore.WithYieldWait(c.YieldWait),
	}
	if c.FailureRetention > 0 {
		opts = append(opts, etcdstore.WithFailureRetention(c.FailureRetention))
	}
	if logger != nil {
		opts = append(opts, etcdstore.WithLogger(logger))
	}
	return append(opts, extra...)
}
