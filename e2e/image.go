package e2e

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// DefaultImage is the tag docker-compose.yml runs.
const DefaultImage = "granary-e2e:dev"

// CheckDocker asks the Docker daemon for its version: it fails, saying
// what to do, when there is no docker command, no daemon, or no access to
// its socket.
func CheckDocker(ctx context.Context) error {
	if _, err := exec.LookPath("docker"); err != nil {
		return errors.New("e2e image: no docker command on $PATH; install Docker first (nothing was built)")
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", "version", "--format", "{{.Server.Version}}")
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		hint := "is the Docker daemon running?"
		if strings.Contains(msg, "permission denied") {
			hint = "this user may not use the Docker socket: run as root, or join the docker group (sudo usermod -aG docker $USER, then log in again)"
		}
		return fmt.Errorf("e2e image: Docker does not answer (%s): %s; nothing was built", msg, hint)
	}
	return nil
}

// busyboxPaths are where Debian's busybox-static puts its binary.
var busyboxPaths = []string{"/bin/busybox", "/usr/bin/busybox"}

// BuildImage builds the e2e image from the repository at repo and tags it.
// It builds granary, granary-run (the light job launcher) and the etcd
// server (the version go.mod requires, so client and server match) with
// CGO_ENABLED=0, adds a static busybox and its applet links (and $GRANARY_TEST_WEED as /bin/weed if set: it must be
// static), and runs `docker build` on the result. Progress goes to log.
//
// It first checks that Docker answers (CheckDocker), so that a user
// without access to its socket learns it before minutes of compiling.
func BuildImage(ctx context.Context, repo, tag string, log io.Writer) error {
	if err := CheckDocker(ctx); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "granary-e2e-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	root := filepath.Join(dir, "rootfs")
	bin := filepath.Join(root, "bin")
	for _, d := range []string{bin, filepath.Join(root, "tmp"), filepath.Join(root, "root"), filepath.Join(root, "etc")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o1777); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		return err
	}

	for _, b := range []struct{ out, pkg string }{
		{"granary", "./cmd/granary"},
		{"granary-run", "./cmd/granary-run"},
		{"etcd", "go.etcd.io/etcd/server/v3"},
	} {
		fmt.Fprintf(log, "e2e image: go build %s (static)\n", b.pkg)
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(bin, b.out), b.pkg)
		cmd.Dir = repo
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("e2e image: go build %s: %v\n%s", b.pkg, err, out)
		}
	}

	// SeaweedFS for the S3 scenario (docker-compose.s3.yml), when .ci/run
	// (or the developer) built a static weed: building it here would take
	// minutes on every image build.
	if weed := os.Getenv("GRANARY_TEST_WEED"); weed != "" {
		fmt.Fprintf(log, "e2e image: adding %s as /bin/weed\n", weed)
		if err := copyFile(weed, filepath.Join(bin, "weed"), 0o755); err != nil {
			return fmt.Errorf("e2e image: $GRANARY_TEST_WEED: %w", err)
		}
	}

	bb, err := findBusybox()
	if err != nil {
		return err
	}
	if err := copyFile(bb, filepath.Join(bin, "busybox"), 0o755); err != nil {
		return err
	}
	list, err := exec.CommandContext(ctx, bb, "--list").Output()
	if err != nil {
		return fmt.Errorf("e2e image: %s --list: %w", bb, err)
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(bin, applet)); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}

	dockerfile := "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin HOME=/root\nWORKDIR /root\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(log, "e2e image: docker build -t %s\n", tag)
	cmd := exec.CommandContext(ctx, "docker", "build", "-q", "-t", tag, dir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("e2e image: docker build: %v\n%s", err, out.Bytes())
	}
	return nil
}

// findBusybox returns a statically linked busybox, or says how to get one.
func findBusybox() (string, error) {
	for _, p := range busyboxPaths {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		static := true
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				static = false
			}
		}
		f.Close()
		if static {
			return p, nil
		}
	}
	return "", errors.New("e2e image: no static busybox in " + strings.Join(busyboxPaths, " or ") +
		": install Debian's busybox-static (apt-get install busybox-static)")
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
