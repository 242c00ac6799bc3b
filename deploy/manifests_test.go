package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

const dir = "kubernetes"

// kustomization is the part of kustomization.yaml the check reads; it
// decodes strictly too.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName"`
		NewTag  string `json:"newTag"`
	} `json:"images"`
}

// objects are the manifests, decoded.
type objects struct {
	k          kustomization
	namespaces []*corev1.Namespace
	accounts   []*corev1.ServiceAccount
	services   []*corev1.Service
	drivers    []*storagev1.CSIDriver
	sets       []*appsv1.StatefulSet
	daemons    []*appsv1.DaemonSet
	pdbs       []*policyv1.PodDisruptionBudget
	jobs       []*batchv1.Job
}

// strict decodes YAML into v, refusing unknown fields.
func strict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	d := json.NewDecoder(bytes.NewReader(j))
	d.DisallowUnknownFields()
	return d.Decode(v)
}

func load(t *testing.T) *objects {
	t.Helper()
	o := &objects{}
	b, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := strict(b, &o.k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
	for _, f := range files {
		if base := filepath.Base(f); base != "kustomization.yaml" && !slices.Contains(o.k.Resources, base) {
			t.Errorf("%s is not listed in kustomization.yaml's resources", base)
		}
	}
	for _, r := range o.k.Resources {
		b, err := os.ReadFile(filepath.Join(dir, r))
		if err != nil {
			t.Fatalf("resource %s: %v", r, err)
		}
		for i, doc := range bytes.Split(b, []byte("\n---\n")) {
			if err := o.add(doc); err != nil {
				t.Errorf("%s, document %d: %v", r, i+1, err)
			}
		}
	}
	return o
}

// add decodes one document into its API type.
func (o *objects) add(doc []byte) error {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return err
	}
	var v any
	switch tm.APIVersion + "/" + tm.Kind {
	case "v1/Namespace":
		x := &corev1.Namespace{}
		o.namespaces, v = append(o.namespaces, x), x
	case "v1/ServiceAccount":
		x := &corev1.ServiceAccount{}
		o.accounts, v = append(o.accounts, x), x
	case "v1/Service":
		x := &corev1.Service{}
		o.services, v = append(o.services, x), x
	case "storage.k8s.io/v1/CSIDriver":
		x := &storagev1.CSIDriver{}
		o.drivers, v = append(o.drivers, x), x
	case "apps/v1/StatefulSet":
		x := &appsv1.StatefulSet{}
		o.sets, v = append(o.sets, x), x
	case "apps/v1/DaemonSet":
		x := &appsv1.DaemonSet{}
		o.daemons, v = append(o.daemons, x), x
	case "policy/v1/PodDisruptionBudget":
		x := &policyv1.PodDisruptionBudget{}
		o.pdbs, v = append(o.pdbs, x), x
	case "batch/v1/Job":
		x := &batchv1.Job{}
		o.jobs, v = append(o.jobs, x), x
	default:
		return fmt.Errorf("unexpected kind %s %s", tm.APIVersion, tm.Kind)
	}
	return strict(doc, v)
}

func TestManifestsDecodeStrictly(t *testing.T) {
	o := load(t)
	for name, n := range map[string]int{"Namespace": len(o.namespaces), "CSIDriver": len(o.drivers), "DaemonSet": len(o.daemons),
		"StatefulSet": len(o.sets), "Service": len(o.services), "PodDisruptionBudget": len(o.pdbs), "Job": len(o.jobs)} {
		if n != 1 {
			t.Errorf("%d %s objects, want 1", n, name)
		}
	}
	if o.k.Namespace != o.namespaces[0].Name {
		t.Errorf("kustomization namespace %q, Namespace object %q", o.k.Namespace, o.namespaces[0].Name)
	}
}

// flagValue returns the value of --name=value in args, or "".
func flagValue(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

func container(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

// checkPod checks a pod template: its labels match selector, its service
// account exists, every mount names a volume (or one of claims, a
// StatefulSet's volume claim templates).
func checkPod(t *testing.T, o *objects, what string, sel *metav1.LabelSelector, tmpl corev1.PodTemplateSpec, claims ...string) {
	t.Helper()
	if sel != nil {
		s, err := metav1.LabelSelectorAsSelector(sel)
		if err != nil || !s.Matches(labels.Set(tmpl.Labels)) {
			t.Errorf("%s: selector %v does not match the pod labels %v (%v)", what, sel, tmpl.Labels, err)
		}
	}
	if sa := tmpl.Spec.ServiceAccountName; sa != "" && !slices.ContainsFunc(o.accounts, func(a *corev1.ServiceAccount) bool { return a.Name == sa }) {
		t.Errorf("%s: service account %q is not defined", what, sa)
	}
	for _, c := range tmpl.Spec.Containers {
		for _, m := range c.VolumeMounts {
			if !slices.Contains(claims, m.Name) && !slices.ContainsFunc(tmpl.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name }) {
				t.Errorf("%s: container %s mounts undefined volume %q", what, c.Name, m.Name)
			}
		}
	}
}

func mountOf(t *testing.T, c corev1.Container, volume string) corev1.VolumeMount {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == volume {
			return m
		}
	}
	t.Fatalf("container %s does not mount %s", c.Name, volume)
	return corev1.VolumeMount{}
}

func volumeOf(t *testing.T, spec corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %q", name)
	return corev1.Volume{}
}
