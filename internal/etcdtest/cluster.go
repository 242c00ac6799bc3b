package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Cluster is an embedded etcd cluster of several members in this process:
// clients on unix sockets, peers on loopback TCP (etcd's peer transport
// dials a URL's host, which a unix socket URL has not).
type Cluster struct {
	// Endpoints are the members' client URLs (unix://…), in member order.
	Endpoints []string

	dir     string
	members []*embed.Etcd
	stops   []func()
}

// StartCluster runs n members for the life of t: fast ticks, fsync off.
// Stop stops one member early; t.Cleanup stops the rest.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	c, err := StartClusterServers(n, false)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// StartClusterServers is StartCluster outside a test; fsync on is what
// production runs (benchmarks want it), off is fast (tests). The caller
// must Close it.
func StartClusterServers(n int, fsync bool) (*Cluster, error) {
	dir, err := os.MkdirTemp("", "etcdc") // short: unix socket paths are limited to ~107 bytes
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	var peers []string
	cfgs := make([]*embed.Config, n)
	for i := range n {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = filepath.Join(dir, cfg.Name)
		client := url.URL{Scheme: "unix", Path: filepath.Join(dir, cfg.Name+".c")}
		port, err := freePort()
		if err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", port)}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
		cfg.AutoCompactionMode, cfg.AutoCompactionRetention = embed.CompactorModePeriodic, "1h"
		if !fsync {
			cfg.TickMs, cfg.ElectionMs, cfg.UnsafeNoFsync = 10, 100, true
		}
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		peers = append(peers, cfg.Name+"="+peer.String())
		c.Endpoints = append(c.Endpoints, client.String())
		cfgs[i] = cfg
	}
	// All members start at once: each waits for the others' peers.
	c.members = make([]*embed.Etcd, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, cfg := range cfgs {
		cfg.InitialCluster = strings.Join(peers, ",")
		wg.Go(func() { c.members[i], errs[i] = embed.StartEtcd(cfg) })
	}
	wg.Wait()
	for i, e := range c.members {
		stop := func() {}
		if e != nil {
			stop = sync.OnceFunc(e.Close) // embed.Etcd.Close panics when called twice
		}
		c.stops = append(c.stops, stop)
		if errs[i] != nil {
			c.Close()
			return nil, fmt.Errorf("start etcd member %d: %w", i, errs[i])
		}
	}
	for i, e := range c.members {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(60 * time.Second):
			c.Close()
			return nil, fmt.Errorf("etcd member %d not ready after 60s", i)
		}
	}
	return c, nil
}

// Stop stops member i. Safe to call twice.
func (c *Cluster) Stop(i int) { c.stops[i]() }

// Close stops every member and removes the cluster's directory.
func (c *Cluster) Close() {
	for _, stop := range c.stops {
		stop()
	}
	os.RemoveAll(c.dir)
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
