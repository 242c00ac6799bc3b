package soak

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdCluster is a 3-member etcd cluster of real processes on 127.0.0.1
// with etcd's default timing (heartbeat 100 ms, election 1 s), as
// production runs, so that a member can be frozen (SIGSTOP, as `docker
// pause` does) or killed and restarted. (node/frozen_test.go has the same
// kind of cluster; it lives in a test file of package node, so it cannot
// be shared without editing that package.)
type etcdCluster struct {
	bin     string
	members []*etcdMember
}

// etcdMember is one etcd process. Its data directory outlives the process,
// so a restart rejoins the cluster with its state.
type etcdMember struct {
	name, clientURL string
	args            []string
	logPath         string
	id              uint64 // etcd's member ID, learnt at start

	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
}

// startEtcd starts the cluster in dir; t.Cleanup kills every member.
func startEtcd(t *testing.T, bin, dir string) *etcdCluster {
	t.Helper()
	ports := freePorts(t, 6)
	c := &etcdCluster{bin: bin}
	var initial []string
	for i := range 3 {
		initial = append(initial, fmt.Sprintf("m%d=http://127.0.0.1:%d", i, ports[2*i+1]))
	}
	for i := range 3 {
		name := fmt.Sprintf("m%d", i)
		client := fmt.Sprintf("http://127.0.0.1:%d", ports[2*i])
		peer := fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1])
		m := &etcdMember{
			name: name, clientURL: client, logPath: filepath.Join(dir, name+".log"),
			args: []string{
				"--name", name, "--data-dir", filepath.Join(dir, name),
				"--listen-client-urls", client, "--advertise-client-urls", client,
				"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
				"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
				// A restarted member keeps its data directory, and etcd
				// ignores the initial-cluster flags then.
				"--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
				"--unsafe-no-fsync", "--log-level", "warn",
			},
		}
		c.members = append(c.members, m)
		if err := c.start(m); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.kill() })
	}
	for _, m := range c.members {
		if err := c.waitReady(m, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// start starts m's process (again), appending to its log.
func (c *etcdCluster) start(m *etcdMember) error {
	logf, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(c.bin, m.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start etcd %s: %w", m.name, err)
	}
	m.cmd, m.exited = cmd, make(chan struct{})
	go func() {
		cmd.Wait() //nolint:errcheck // the soak kills it; its log says why it ended otherwise
		logf.Close()
		close(m.exited)
	}()
	return nil
}

// waitReady waits until m answers and knows a leader.
func (c *etcdCluster) waitReady(m *etcdMember, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		st, err := m.status()
		if err == nil && st.Leader != 0 {
			m.id = st.Header.MemberId
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("etcd member %s not ready within %v: %v (log: %s)", m.name, within, err, m.logPath)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kill kills m (thawing it first, so the kill is not held up) and waits
// for the process. It does nothing if m is not running.
func (m *etcdMember) kill() {
	if m.cmd == nil {
		return
	}
	m.cmd.Process.Signal(syscall.SIGCONT) //nolint:errcheck // it may have exited
	m.cmd.Process.Kill()                  //nolint:errcheck // it may have exited
	<-m.exited
}

// signal sends sig to m: SIGSTOP freezes it, SIGCONT thaws it.
func (m *etcdMember) signal(sig syscall.Signal) error {
	return m.cmd.Process.Signal(sig)
}

func (c *etcdCluster) endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.clientURL)
	}
	return eps
}

// status asks m alone.
func (m *etcdMember) status() (*clientv3.StatusResponse, error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{m.clientURL}, Logger: zap.NewNop(), DialTimeout: time.Second})
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return cli.Status(ctx, m.clientURL)
}

// leader returns the member the others follow, and a follower, asking
// for at most within (a moment after a fault, or on a busy machine, the
// members may not answer or know one yet).
func (c *etcdCluster) leader(within time.Duration) (leader, follower *etcdMember, err error) {
	deadline := time.Now().Add(within)
	for {
		leader, follower, err = c.findLeader()
		if err == nil || time.Now().After(deadline) {
			return leader, follower, err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *etcdCluster) findLeader() (leader, follower *etcdMember, err error) {
	for _, m := range c.members {
		st, err := m.status()
		if err != nil {
			continue
		}
		for _, l := range c.members {
			if l.id == st.Leader {
				leader = l
			}
		}
		if leader != nil {
			break
		}
	}
	if leader == nil {
		return nil, nil, errors.New("no etcd member knows a leader")
	}
	for _, m := range c.members {
		if m != leader {
			return leader, m, nil
		}
	}
	return nil, nil, errors.New("no follower")
}
