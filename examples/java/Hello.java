/** A Java program in an enclave, on a runtime trimmed with jlink. */
public class Hello {
    public static void main(String[] args) {
        System.out.println("hello from java " + System.getProperty("java.version")
                + " in " + System.getProperty("os.name") + ", args " + String.join(" ", args));
    }
}
