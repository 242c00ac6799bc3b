package node

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
)

// ClientConfig turns c into an etcd client configuration for endpoints:
// TLS from CACert/Cert/Key, user and password, and HTTP/2 keep-alive pings
// every 10 s (above the server's 5 s minimum) with a 5 s timeout.
func (c *Config) ClientConfig(endpoints []string) (clientv3.Config, error) {
	cc := clientv3.Config{
		Endpoints:            endpoints,
		DialTimeout:          c.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		Username:             c.User,
		Password:             c.Password,
		Logger:               zap.NewNop(),
	}
	if c.CACert != "" || c.Cert != "" {
		ti := transport.TLSInfo{CertFile: c.Cert, KeyFile: c.Key, TrustedCAFile: c.CACert}
		tc, err := ti.ClientConfig()
		if err != nil {
			return cc, fmt.Errorf("granary: TLS configuration: %w", err)
		}
		cc.TLS = tc
	}
	return cc, nil
}

// Dial returns a client of endpoints (c.Endpoints, or the embedded node's
// socket when there are none) and checks that etcd answers within
// OpTimeout. The caller must Close it.
func Dial(ctx context.Context, c *Config) (*clientv3.Client, error) {
	eps := c.Endpoints
	if c.Embedded() {
		eps = []string{c.LocalEndpoint()}
	}
	cc, err := c.ClientConfig(eps)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(cc)
	if err != nil {
		return nil, fmt.Errorf("granary: etcd client for %v: %w", eps, err)
	}
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), c.OpTimeout)
	defer cancel()
	if _, err := cli.Get(cctx, "health", clientv3.WithCountOnly()); err != nil {
		cli.Close()
		return nil, fmt.Errorf("%w: %v within %v: %v", ErrUnreachable, eps, c.OpTimeout, err)
	}
	return cli, nil
}

// OpenCache opens the remote cache c.Cache names (with c.CacheToken and
// c.CacheCACert), or
// returns nil, nil when there is none. It does no network I/O. The caller
// must Close it after the stores that use it.
func (c *Config) OpenCache() (*cache.Remote, error) {
	if c.Cache == "" {
		return nil, nil
	}
	var opts []cache.Option
	if c.CacheToken != "" {
		opts = append(opts, cache.WithBearerToken(c.CacheToken))
	}
	if c.CacheCACert != "" {
		opts = append(opts, cache.WithCAFile(c.CacheCACert))
	}
	return cache.Open(c.Cache, opts...)
}

// StoreOptions are the etcdstore options c implies, followed by extra.
func (c *Config) StoreOptions(logger *slog.Logger, extra ...etcdstore.Option) []etcdstore.Option {
	opts := []etcdstore.Option{
		etcdstore.WithPrefix(c.Prefix),
		etcdstore.WithTTL(c.TTL),
		etcdstore.WithHost(c.Name),
		etcdstore.WithOpTimeout(c.OpTimeout),
	}
	if logger != nil {
		opts = append(opts, etcdstore.WithLogger(logger))
	}
	return append(opts, extra...)
}
