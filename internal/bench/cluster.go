package bench

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// cluster is an embedded etcd cluster of several members in this process,
// with fsync on (as production runs).
type cluster struct {
	dir       string
	members   []*embed.Etcd
	endpoints []string
}

// startCluster starts n members under a short temporary directory (unix
// socket paths are limited to ~107 bytes) and waits until all are ready.
// Members started but not ready are stopped without waiting for a quorum.
func startCluster(n int) (*cluster, error) {
	dir, err := os.MkdirTemp("", "farm")
	if err != nil {
		return nil, err
	}
	c := &cluster{dir: dir}
	var initial []string
	cfgs := make([]*embed.Config, n)
	for i := range n {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = filepath.Join(dir, cfg.Name)
		// Clients on unix sockets; peers on loopback TCP (etcd's peer
		// transport dials a URL's host, which a unix socket URL has not).
		client := url.URL{Scheme: "unix", Path: filepath.Join(dir, cfg.Name+".c")}
		port, err := freePort()
		if err != nil {
			c.close()
			return nil, err
		}
		peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", port)}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
		cfg.AutoCompactionMode, cfg.AutoCompactionRetention = embed.CompactorModePeriodic, "1h"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		initial = append(initial, cfg.Name+"="+peer.String())
		c.endpoints = append(c.endpoints, client.String())
		cfgs[i] = cfg
	}
	for _, cfg := range cfgs {
		cfg.InitialCluster = strings.Join(initial, ",")
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			c.close()
			return nil, fmt.Errorf("start etcd member %s: %w", cfg.Name, err)
		}
		c.members = append(c.members, e)
	}
	for _, e := range c.members {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(60 * time.Second):
			c.close()
			return nil, fmt.Errorf("etcd member %s not ready after 60s", e.Config().Name)
		}
	}
	return c, nil
}

func (c *cluster) close() {
	for _, e := range c.members {
		e.Close()
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
